"""The controller's own records, beside the feedback store: drift windows, trigger decisions, training runs.

Tables (in the feedback store's database, SQLite or PostgreSQL):

    drift_windows      id, model_version, events_seen, drifted (JSON list), signals (JSON), evaluated_at
    trigger_decisions  id, decided_at, source, outcome, reason, detail
    training_runs      id, source, reason, started_at, finished_at, status, exit_code, pid, new_rows, log_path

A run's status is `running`, then `succeeded` or `failed` (by exit code), or `lost` when the
controller restarted and the process had gone without it seeing the exit.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monitoring.trigger import Decision
from monitoring.windows import WindowReport
from tuneloop.clock import utc_iso, utc_now
from tuneloop.database import Database, Migration
from tuneloop.store_backends import open_database

MIGRATIONS = [
    Migration(1, "drift windows, trigger decisions, training runs", """
CREATE TABLE IF NOT EXISTS drift_windows (
    id {identity}, model_version INTEGER NOT NULL, events_seen INTEGER NOT NULL,
    drifted TEXT NOT NULL, signals TEXT NOT NULL, evaluated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trigger_decisions (
    id {identity}, decided_at TEXT NOT NULL, source TEXT NOT NULL, outcome TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS training_runs (
    id {identity}, source TEXT NOT NULL, reason TEXT NOT NULL, started_at TEXT NOT NULL,
    started_unix DOUBLE PRECISION NOT NULL, finished_at TEXT, status TEXT NOT NULL, exit_code INTEGER, pid INTEGER,
    new_rows INTEGER NOT NULL, log_path TEXT
)
"""),
]


class ControllerState:
    def __init__(self, url: str | Path) -> None:
        """`url`: the feedback store's (controller.store_url)."""
        self._db: Database = open_database(url)
        self._db.migrate("controller_state", MIGRATIONS)

    def record_window(self, report: WindowReport) -> None:
        signals = [asdict(s) | {"drifted": s.drifted} for s in report.signals]
        self._db.execute(
            "INSERT INTO drift_windows (model_version, events_seen, drifted, signals, evaluated_at) VALUES (?, ?, ?, ?, ?)",
            (report.model_version, report.events_seen, json.dumps(report.drifted()), json.dumps(signals), utc_now()),
        )

    def windows(self, model_version: int | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM drift_windows", ()
        if model_version is not None:
            query, args = query + " WHERE model_version = ?", (model_version,)
        rows = self._db.execute(query + " ORDER BY id", args).dicts()
        for row in rows:
            row["drifted"], row["signals"] = json.loads(row["drifted"]), json.loads(row["signals"])
        return rows

    def record_decision(self, decision: Decision) -> None:
        self._db.execute(
            "INSERT INTO trigger_decisions (decided_at, source, outcome, reason, detail) VALUES (?, ?, ?, ?, ?)",
            (utc_now(), decision.source, decision.outcome, decision.reason, decision.detail),
        )

    def decisions(self, last: int | None = None) -> list[dict[str, Any]]:
        """Oldest first; only the latest `last` when given (the table grows with every suppressed decision)."""
        if last is None:
            return self._db.execute("SELECT * FROM trigger_decisions ORDER BY id").dicts()
        latest = "SELECT * FROM (SELECT * FROM trigger_decisions ORDER BY id DESC LIMIT ?) AS latest ORDER BY id"
        return self._db.execute(latest, (last,)).dicts()

    def start_run(self, decision: Decision, new_rows: int, now: float) -> int:
        return int(self._db.execute(
            "INSERT INTO training_runs (source, reason, started_at, started_unix, status, new_rows) "
            "VALUES (?, ?, ?, ?, 'running', ?) RETURNING id",
            (decision.source, decision.detail, utc_iso(now), now, new_rows),
        ).scalar())

    def run_started(self, run_id: int, pid: int, log_path: Path) -> None:
        self._db.execute("UPDATE training_runs SET pid = ?, log_path = ? WHERE id = ?", (pid, str(log_path), run_id))

    def finish_run(self, run_id: int, status: str, exit_code: int | None) -> None:
        self._db.execute(
            "UPDATE training_runs SET status = ?, exit_code = ?, finished_at = ? WHERE id = ?",
            (status, exit_code, utc_now(), run_id),
        )

    def runs(self) -> list[dict[str, Any]]:
        return self._db.execute("SELECT * FROM training_runs ORDER BY id").dicts()

    def running(self) -> list[dict[str, Any]]:
        return self._db.execute("SELECT * FROM training_runs WHERE status = 'running' ORDER BY id").dicts()

    def last_run_started(self) -> float | None:
        return self._db.execute("SELECT MAX(started_unix) FROM training_runs").scalar()

    def runs_since(self, unix_seconds: float) -> int:
        return self._db.execute("SELECT COUNT(*) FROM training_runs WHERE started_unix >= ?", (unix_seconds,)).scalar()
