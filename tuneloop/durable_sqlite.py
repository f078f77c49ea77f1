"""SQLite opened the one way every durable store here needs it, and the store's SQLite backend."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tuneloop.database import LOCK_CHECK_S, Database, Result
from tuneloop.errors import Conflict

log = logging.getLogger("tuneloop.store")


def connect(path: Path, schema: str = "") -> sqlite3.Connection:
    """WAL for concurrent readers across processes; synchronous=FULL, so a returned commit is on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    if schema:
        connection.executescript(schema)
    return connection


class SqliteDatabase(Database):
    """A file on this host (the embedded default): every process that opens it must share the disk."""

    name = "sqlite"
    identity = "INTEGER PRIMARY KEY AUTOINCREMENT"
    row_number_column = ""  # every table has its rowid
    row_number = "rowid"
    skip_locked = ""  # one writer at a time: a statement that picks a row and changes it is alone
    now_unix = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.path = Path(url)
        self._connection = connect(self.path)

    @classmethod
    def accepts(cls, url: str) -> bool:
        return "://" not in url

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        with self._held:
            cursor = self._connection.execute(sql, params)
            rows = cursor.fetchall()
            columns = [d[0] for d in cursor.description or ()]
            return Result(columns, rows, cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._held:
            self._connection.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._held:
            self._connection.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write
            try:
                yield
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    @contextlib.contextmanager
    def exclusive(self, name: str, wait: threading.Event | None = None) -> Iterator[threading.Event]:
        """An flock on a file beside the database."""
        path = self.path.with_name(f"{self.path.name}.{name}.lock")
        waited = False
        with path.open("a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                if wait is not None and not waited:
                    log.info("another %s holds %s; waiting for it to stop", name, self.url)
                    waited = True
                if wait is None or wait.wait(LOCK_CHECK_S):
                    raise Conflict(f"another {name} holds {self.url}; stop it first (one {name} per store)")
            held = threading.Event()
            held.set()  # an flock is not lost while its process lives
            try:
                yield held
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def close(self) -> None:
        self._connection.close()
