"""The controller's own records, beside the feedback store: drift windows, trigger decisions, training runs.

Tables (in the feedback store's database, SQLite or PostgreSQL):

    drift_windows      id, model_version, events_seen, drifted (JSON list), signals (JSON), evaluated_at
    trigger_decisions  id, decided_at, source, outcome, reason, detail

Training runs, requested by the controller and claimed by workers, are `tuneloop.runs`' (`runs` here reads them).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monitoring.trigger import Decision
from monitoring.windows import WindowReport
from tuneloop.clock import utc_now
from tuneloop.database import Database, Migration
from tuneloop.runs import RunQueue
from tuneloop.store_backends import open_database

MIGRATIONS = [
    Migration(1, "drift windows, trigger decisions", """
CREATE TABLE IF NOT EXISTS drift_windows (
    id {identity}, model_version INTEGER NOT NULL, events_seen INTEGER NOT NULL,
    drifted TEXT NOT NULL, signals TEXT NOT NULL, evaluated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trigger_decisions (
    id {identity}, decided_at TEXT NOT NULL, source TEXT NOT NULL, outcome TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL
)
"""),  # training_runs, created here once too, are tuneloop.runs' own component now
]


class ControllerState:
    def __init__(self, url: str | Path) -> None:
        """`url`: the feedback store's (controller.store_url)."""
        self._db: Database = open_database(url)
        self._db.migrate("controller_state", MIGRATIONS)
        self.run_queue = RunQueue(url)

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

    def runs(self) -> list[dict[str, Any]]:
        return self.run_queue.all()
