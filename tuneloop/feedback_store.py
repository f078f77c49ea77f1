"""The durable feedback store (SQLite or PostgreSQL, tuneloop.database): the controller writes it, the trainer reads it.

Schema:

    predictions       request_id PK, text, label, scores (JSON), model_version, created_at
    feedback          feedback_id PK, request_id, text, label, predicted_label, model_version,
                      source, created_at (sent by the application), stored_at
    pending_feedback  feedback_id PK, request_id, payload (the message), received_at (unix s):
                      feedback whose prediction has not arrived yet
    shadow_predictions  (request_id, model_version) PK, label, created_at: what a candidate in
                      shadow said about a served request; joined to its feedback when judged

Feedback with a request_id is joined to its prediction (text, predicted label, version). Writes
are idempotent by key, so a redelivered message stores nothing twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tuneloop.clock import utc_now
from tuneloop.database import Database, Migration
from tuneloop.events import FeedbackEvent, PredictionEvent
from tuneloop.store_backends import open_database

MIGRATIONS = [
    Migration(1, "predictions, feedback, pending feedback, shadow predictions", """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY, text TEXT NOT NULL, label TEXT NOT NULL, scores TEXT NOT NULL,
    model_version INTEGER NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    {row_number} feedback_id TEXT PRIMARY KEY, request_id TEXT, text TEXT NOT NULL, label TEXT NOT NULL,
    predicted_label TEXT, model_version INTEGER, source TEXT NOT NULL, created_at TEXT NOT NULL,
    stored_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_feedback (
    feedback_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, payload TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS shadow_predictions (
    request_id TEXT NOT NULL, model_version INTEGER NOT NULL, label TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (request_id, model_version)
);
CREATE INDEX IF NOT EXISTS feedback_by_request ON feedback (request_id);
CREATE INDEX IF NOT EXISTS pending_by_request ON pending_feedback (request_id);
CREATE INDEX IF NOT EXISTS feedback_by_version ON feedback (model_version, stored_at);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (stored_at)
"""),
]

_FEEDBACK_COLUMNS = ("feedback_id, request_id, text, label, predicted_label, model_version, source, created_at, "
                     "stored_at")
_INSERT_FEEDBACK = f"INSERT INTO feedback ({_FEEDBACK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    pending: int = 0


class FeedbackStore:
    def __init__(self, url: str | Path) -> None:
        """`url`: a SQLite file path or a postgresql:// URL (controller.store_url)."""
        self._db: Database = open_database(url)
        self._db.migrate("feedback_store", MIGRATIONS)

    @property
    def url(self) -> str:
        return self._db.url

    def write(self, predictions: list[PredictionEvent], feedback: list[FeedbackEvent]) -> WriteResult:
        """Store a consumed batch in one transaction: all of it or none of it."""
        result = WriteResult()
        stored_at = utc_now()
        with self._db.transaction():
            self._db.executemany(
                "INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(p.request_id, p.text, p.label, json.dumps(p.scores), p.model_version, p.timestamp)
                 for p in predictions if not p.shadow],
            )
            self._db.executemany(
                "INSERT INTO shadow_predictions VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(p.request_id, p.model_version, p.label, p.timestamp) for p in predictions if p.shadow],
            )
            ids = [e.feedback_id for e in feedback]
            known = {i for table in ("feedback", "pending_feedback")
                     for (i,) in self._where_in(f"SELECT feedback_id FROM {table}", "feedback_id", ids)}
            served = {request_id: rest for request_id, *rest in self._where_in(
                "SELECT request_id, text, label, model_version FROM predictions", "request_id",
                sorted({e.request_id for e in feedback if e.request_id is not None}))}
            rows, pending = [], []
            for event in feedback:
                if event.feedback_id in known:  # stored before, waiting, or earlier in this batch
                    result.duplicates += 1
                    continue
                known.add(event.feedback_id)
                if event.request_id is not None and event.request_id not in served:
                    pending.append((event.feedback_id, event.request_id, event.model_dump_json(), time.time()))
                else:
                    rows.append(self._row(event, served.get(event.request_id), stored_at))
            self._db.executemany("INSERT INTO pending_feedback VALUES (?, ?, ?, ?)", pending)
            self._db.executemany(_INSERT_FEEDBACK, rows)
            result.pending, result.stored = len(pending), len(rows) + self._resolve_pending(stored_at)
        return result

    def _where_in(self, select: str, column: str, keys: list[str]) -> list[tuple]:
        """`select` for the rows whose `column` is one of `keys`: a statement per 500 keys, not one per key."""
        rows: list[tuple] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows += self._db.execute(f"{select} WHERE {column} IN ({', '.join('?' * len(chunk))})", chunk).fetchall()
        return rows

    @staticmethod
    def _row(event: FeedbackEvent, prediction: list | None, stored_at: str) -> tuple:
        """A feedback row; with its prediction, the text that was served, whatever text came with the label."""
        text, predicted, version = prediction if prediction is not None else (event.text, None, None)
        return (event.feedback_id, event.request_id, text, event.label, predicted, version, event.source,
                event.timestamp, stored_at)

    def _resolve_pending(self, stored_at: str) -> int:
        """Store the waiting feedback whose prediction has arrived."""
        joined = self._db.execute(
            "SELECT f.payload, p.text, p.label, p.model_version FROM pending_feedback f "
            "JOIN predictions p ON p.request_id = f.request_id"
        ).fetchall()
        events = [(FeedbackEvent.model_validate_json(payload), rest) for payload, *rest in joined]
        self._db.executemany(_INSERT_FEEDBACK, [self._row(event, rest, stored_at) for event, rest in events])
        self._db.executemany("DELETE FROM pending_feedback WHERE feedback_id = ?", [(e.feedback_id,) for e, _ in events])
        return len(events)

    def expired_pending(self, older_than_s: float) -> list[tuple[str, str]]:
        """(feedback_id, payload) of feedback whose prediction did not arrive in time."""
        return self._db.execute(
            "SELECT feedback_id, payload FROM pending_feedback WHERE received_at < ? ORDER BY received_at",
            (time.time() - older_than_s,),
        ).fetchall()

    def drop_pending(self, feedback_ids: list[str]) -> None:
        with self._db.transaction():
            self._db.executemany("DELETE FROM pending_feedback WHERE feedback_id = ?", [(i,) for i in feedback_ids])

    def count(self, table: str = "feedback") -> int:
        if table not in ("feedback", "predictions", "pending_feedback"):
            raise ValueError(f"no table {table}")
        return self._db.execute(f"SELECT COUNT(*) FROM {table}").scalar()

    def prune_predictions(self, before: str) -> int:
        """Delete predictions (served and shadow) made before `before` (a stored timestamp); feedback stays.
        Returns how many went. Feedback joins a prediction within controller.join_timeout_s, long before."""
        with self._db.transaction():
            served = self._db.execute("DELETE FROM predictions WHERE created_at < ?", (before,)).rowcount
            shadow = self._db.execute("DELETE FROM shadow_predictions WHERE created_at < ?", (before,)).rowcount
        return served + shadow

    def feedback_rows(self, after: int = 0) -> list[dict[str, object]]:
        """Stored feedback, each row with its `row_id` (increasing in storing order); only rows after `after`."""
        row = self._db.row_number
        return self._db.execute(
            f"SELECT {row} AS row_id, {_FEEDBACK_COLUMNS} FROM feedback WHERE {row} > ? ORDER BY stored_at, feedback_id",
            (after,),
        ).dicts()

    # (true label, predicted label) of the feedback on predictions one version served.
    _LABELLED = "SELECT label, predicted_label FROM feedback WHERE model_version = ? AND predicted_label IS NOT NULL "

    def recent_labelled(self, model_version: int, limit: int) -> list[tuple[str, str]]:
        """The latest `limit` labelled pairs of a version."""
        return self._db.execute(
            self._LABELLED + "ORDER BY stored_at DESC, feedback_id DESC LIMIT ?", (model_version, limit)
        ).fetchall()

    def count_stored_since(self, stored_at: str | None) -> int:
        """Feedback rows stored after an ISO timestamp (all of them for None)."""
        if stored_at is None:
            return self.count("feedback")
        return self._db.execute("SELECT COUNT(*) FROM feedback WHERE stored_at > ?", (stored_at,)).scalar()

    def last_stored_at(self) -> str | None:
        """When the newest feedback row was stored (ISO), or None for an empty store."""
        return self._db.execute("SELECT MAX(stored_at) FROM feedback").scalar()

    def labelled_since(self, model_version: int, stored_after: str) -> list[tuple[str, str]]:
        """The labelled pairs of a version stored after an ISO time."""
        return self._db.execute(self._LABELLED + "AND stored_at > ?", (model_version, stored_after)).fetchall()

    def shadow_pairs(self, candidate: int, stored_after: str) -> list[tuple[str, str, str]]:
        """(true label, served label, shadow label) for feedback stored after a time on requests the
        candidate scored in shadow: both models judged on the very same texts."""
        return self._db.execute(
            "SELECT f.label, f.predicted_label, s.label FROM feedback f "
            "JOIN shadow_predictions s ON s.request_id = f.request_id AND s.model_version = ? "
            "WHERE f.predicted_label IS NOT NULL AND f.stored_at > ?",
            (candidate, stored_after),
        ).fetchall()

    def close(self) -> None:
        self._db.close()
