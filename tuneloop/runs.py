"""Training runs as requests in the store: requested by the controller, claimed by one worker, kept alive by
heartbeats, finished by the run itself or, when it goes silent, by the controller.

A run's status moves `requested` → `running` (a worker claimed it) → `succeeded`, `rejected`, `skipped` or
`failed`. The worker (`tuneloop.worker`: inside the controller's process, or `tuneloop trainer` on another host)
starts the run's process, `tuneloop train --run-id N`, which beats every `trigger.heartbeat_timeout_s / 6` and
records its own end, so a run outlives the worker and the controller that started it. A run that has not beaten for
`trigger.heartbeat_timeout_s` (its host, worker and process gone, or cut off) is marked failed by the leading
controller; its process, if it still lives, finds the run withdrawn at its next beat and before publishing, and
stops without publishing.

On PostgreSQL workers on many hosts claim with `FOR UPDATE SKIP LOCKED`: one claimant per request, none waiting
on another's lock. On SQLite (one host) a write is alone anyway.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.clock import utc_iso, utc_now
from tuneloop.database import Database, Migration
from tuneloop.errors import RUN_STATUS, RunWithdrawn
from tuneloop.store_backends import open_database

log = logging.getLogger("tuneloop.runs")

ACTIVE = ("requested", "running")
HEARTBEATS_PER_TIMEOUT = 6  # a run beats this often within the timeout: a late beat or two is no death

MIGRATIONS = [
    # Created by the controller's records (`controller_state` version 1) before it had its own component.
    Migration(1, "training runs", """
CREATE TABLE IF NOT EXISTS training_runs (
    id {identity}, source TEXT NOT NULL, reason TEXT NOT NULL, started_at TEXT NOT NULL,
    started_unix DOUBLE PRECISION NOT NULL, finished_at TEXT, status TEXT NOT NULL, exit_code INTEGER, pid INTEGER,
    new_rows INTEGER NOT NULL, log_path TEXT
)
"""),
    Migration(2, "requests claimed by workers, heartbeats", """
ALTER TABLE training_runs ADD COLUMN worker TEXT;
ALTER TABLE training_runs ADD COLUMN claimed_unix DOUBLE PRECISION;
ALTER TABLE training_runs ADD COLUMN heartbeat_unix DOUBLE PRECISION;
ALTER TABLE training_runs ADD COLUMN detail TEXT;
CREATE INDEX IF NOT EXISTS training_runs_status ON training_runs (status, id);
UPDATE training_runs SET heartbeat_unix = started_unix WHERE status = 'running'
"""),  # a run left running by an older controller beats no more: it expires like any silent one
]


@dataclass(frozen=True)
class ClaimedRun:
    run_id: int
    started_unix: float  # when the controller requested it: a run's time budget counts from here


class RunQueue:
    """The `training_runs` table, in the feedback store's database (controller.store_url)."""

    def __init__(self, url: str | Path) -> None:
        self._db: Database = open_database(url)
        self._db.migrate("training_runs", MIGRATIONS)

    def request(self, source: str, reason: str, new_rows: int, now: float) -> int:
        return int(self._db.execute(
            "INSERT INTO training_runs (source, reason, started_at, started_unix, status, new_rows) "
            "VALUES (?, ?, ?, ?, 'requested', ?) RETURNING id",
            (source, reason, utc_iso(now), now, new_rows),
        ).scalar())

    def claim(self, worker: str) -> ClaimedRun | None:
        """The oldest request, now `running` on `worker`; None when there is none."""
        now = self._db.now_unix  # heartbeats are written and judged by the database's clock, not the hosts'
        row = self._db.execute(
            f"UPDATE training_runs SET status = 'running', worker = ?, claimed_unix = {now}, heartbeat_unix = {now} "
            "WHERE status = 'requested' AND id = (SELECT id FROM training_runs WHERE status = 'requested' "
            f"ORDER BY id LIMIT 1{self._db.skip_locked}) RETURNING id, started_unix",
            (worker,),
        ).fetchone()
        return ClaimedRun(int(row[0]), float(row[1])) if row else None

    def started(self, run_id: int, pid: int, log_path: Path) -> None:
        """Where to look: the run's process and its log on the worker's host."""
        self._db.execute("UPDATE training_runs SET pid = ?, log_path = ? WHERE id = ?", (pid, str(log_path), run_id))

    def heartbeat(self, run_id: int) -> bool:
        """The run is alive; False when it is no longer `running` (withdrawn: it must stop, publishing nothing)."""
        return self._db.execute(f"UPDATE training_runs SET heartbeat_unix = {self._db.now_unix} "
                                "WHERE id = ? AND status = 'running'", (run_id,)).rowcount == 1

    def finish(self, run_id: int, status: str, exit_code: int | None, detail: str = "") -> bool:
        """Record a running run's end; False (changing nothing) when it had already ended or was withdrawn."""
        return self._db.execute(
            "UPDATE training_runs SET status = ?, exit_code = ?, finished_at = ?, detail = ? "
            "WHERE id = ? AND status = 'running'",
            (status, exit_code, utc_now(), detail or None, run_id),
        ).rowcount == 1

    def finish_by_exit_code(self, run_id: int, exit_code: int, detail: str = "") -> bool:
        return self.finish(run_id, RUN_STATUS.get(exit_code, "failed"), exit_code, detail)

    def expire(self, timeout_s: float, claim_timeout_s: float | None = None) -> list[int]:
        """Mark failed the running runs that have not beaten for `timeout_s`, and the requests no worker claimed
        within `claim_timeout_s` (counted by the requester's clock); their ids."""
        rows = self._db.execute(
            "UPDATE training_runs SET status = 'failed', finished_at = ?, detail = ? "
            f"WHERE status = 'running' AND heartbeat_unix < {self._db.now_unix} - ? RETURNING id",
            (utc_now(), f"no heartbeat for {timeout_s:g} s: its process, worker or host is gone", timeout_s),
        ).fetchall()
        if claim_timeout_s is not None:
            rows += self._db.execute(
                "UPDATE training_runs SET status = 'failed', finished_at = ?, detail = ? "
                "WHERE status = 'requested' AND started_unix < ? RETURNING id",
                (utc_now(), (f"no worker claimed it in {claim_timeout_s:g} s: is a `tuneloop trainer` running, "
                             "with the same controller.store_url?"), time.time() - claim_timeout_s),
            ).fetchall()
        return sorted(int(r[0]) for r in rows)

    def get(self, run_id: int) -> dict[str, Any] | None:
        rows = self._db.execute("SELECT * FROM training_runs WHERE id = ?", (run_id,)).dicts()
        return rows[0] if rows else None

    def all(self) -> list[dict[str, Any]]:
        return self._db.execute("SELECT * FROM training_runs ORDER BY id").dicts()

    def active(self) -> list[dict[str, Any]]:
        """Requested or running, oldest first."""
        return self._db.execute(
            "SELECT * FROM training_runs WHERE status IN ('requested', 'running') ORDER BY id").dicts()

    def last_started(self) -> float | None:
        return self._db.execute("SELECT MAX(started_unix) FROM training_runs").scalar()

    def started_since(self, unix_seconds: float) -> int:
        return self._db.execute("SELECT COUNT(*) FROM training_runs WHERE started_unix >= ?", (unix_seconds,)).scalar()

    def close(self) -> None:
        self._db.close()


@contextlib.contextmanager
def heartbeats(queue: RunQueue, run_id: int, timeout_s: float, on_withdrawn: Callable[[], None]) -> Iterator[None]:
    """Beat for `run_id` while inside, from a thread; call `on_withdrawn` (from that thread) once the run is found
    withdrawn. Raises RunWithdrawn at once when the run is not `running` on entry."""
    if not queue.heartbeat(run_id):
        row = queue.get(run_id)
        status = row["status"] if row else "unknown to the store"
        raise RunWithdrawn(f"training run {run_id} is {status}, not running: the controller requests runs and a "
                           "worker claims them (`tuneloop trainer`); without --run-id, `tuneloop train` runs alone")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(timeout_s / HEARTBEATS_PER_TIMEOUT):
            try:
                alive = queue.heartbeat(run_id)
            except Exception as exc:  # the store away: the next beat tries again, the controller's timeout decides
                log.warning("training run %s: heartbeat not recorded (%s)", run_id, exc)
                continue
            if not alive:
                on_withdrawn()
                return

    thread = threading.Thread(target=beat, name=f"run-{run_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
