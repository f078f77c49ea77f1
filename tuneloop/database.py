"""The controller's SQL database, SQLite or PostgreSQL by its URL, behind one interface.

The feedback store and the controller's records write their statements once: `?` placeholders and SQL
both dialects speak (`ON CONFLICT DO NOTHING`, `RETURNING`). What differs lives in a backend: how a
connection is made and a transaction begins, the placeholder, the DDL of an identity column, and how
one process holds a named lock against every other. `tuneloop.store_backends` picks the backend by the URL.

Schemas change only by numbered migrations, recorded per component in `schema_migrations`; each is
applied once, in one transaction with its record, under a lock, so processes that open the same
database at once (the controller and a training run) neither apply one twice nor see half of one.
"""

from __future__ import annotations

import contextlib
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from tuneloop.clock import utc_now
from tuneloop.errors import StoreError

LOCK_CHECK_S = 2.0  # how often a lock is tried while waiting for it, and its holder checks it still has it


@dataclass(frozen=True)
class Migration:
    """One schema change. `sql` holds statements separated by `;`, with `{identity}` for an auto-increment
    integer primary key and `{row_number}` for the column (or nothing) that numbers a table's rows in
    insertion order, read back as `Database.row_number`."""

    version: int
    description: str
    sql: str


@dataclass(frozen=True)
class Result:
    """A statement's rows, fetched whole while the connection was held."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    rowcount: int

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def scalar(self) -> Any:
        row = self.fetchone()
        return row[0] if row else None


class Database(ABC):
    """One connection, shared by the threads of a process: a statement or a transaction holds it whole."""

    name: ClassVar[str]
    identity: ClassVar[str]  # DDL of an auto-increment integer primary key
    row_number_column: ClassVar[str]  # DDL (with its comma) of a column numbering rows in insertion order
    row_number: ClassVar[str]  # how a query reads that number
    skip_locked: ClassVar[str]  # after a SELECT in an UPDATE: rows another transaction is changing are passed over
    now_unix: ClassVar[str]  # the database's clock in unix seconds: one clock for processes on many hosts

    def __init__(self, url: str) -> None:
        self.url = url
        self._held = threading.RLock()

    @classmethod
    @abstractmethod
    def accepts(cls, url: str) -> bool:
        """Whether this backend opens `url`."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """All statements inside commit together or not at all; writers are serialized from the first."""

    @abstractmethod
    def exclusive(self, name: str, wait: threading.Event | None = None
                  ) -> contextlib.AbstractContextManager[threading.Event]:
        """Hold the lock `name` on this database while inside (across hosts where the database is shared). When
        another process holds it: raise Conflict, or with `wait`, try again every LOCK_CHECK_S until it is free
        (raising Conflict if `wait` is set first). It goes with the process, however that ends. Yields an event
        set while the lock is known held (cleared while a lost connection to a server is being replaced)."""

    @abstractmethod
    def close(self) -> None: ...

    def _lock_migrations(self) -> None:
        """Inside the migration's transaction: keep other processes out until it commits."""

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        """Apply the migrations of `component` not yet applied, in order, each with its record."""
        known = max(m.version for m in migrations)
        with self.transaction():
            self._lock_migrations()
            self.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL, "
                "description TEXT NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (component, version))"
            )
            applied = {v for (v,) in self.execute(
                "SELECT version FROM schema_migrations WHERE component = ?", (component,)).fetchall()}
            if applied and max(applied) > known:
                raise StoreError(
                    f"{self.display_url} holds {component} schema version {max(applied)}, newer than this tuneloop's "
                    f"({known}); upgrade tuneloop before opening it"
                )
            for migration in sorted(migrations, key=lambda m: m.version):
                if migration.version in applied:
                    continue
                ddl = migration.sql.format(identity=self.identity, row_number=self.row_number_column)
                for statement in filter(str.strip, ddl.split(";")):
                    self.execute(statement)
                self.execute("INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                              (component, migration.version, migration.description, utc_now()))

    def schema_versions(self) -> dict[str, int]:
        """The newest migration applied, per component."""
        rows = self.execute("SELECT component, MAX(version) FROM schema_migrations GROUP BY component").fetchall()
        return dict(rows)

    @property
    def display_url(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """A store URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)  # libpq takes it here too
    return urlunsplit(parts._replace(query=query))
