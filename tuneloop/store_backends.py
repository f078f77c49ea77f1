"""Which database a store URL names: PostgreSQL for a postgresql:// URL, SQLite for a path."""

from __future__ import annotations

from pathlib import Path

from tuneloop.database import Database
from tuneloop.durable_sqlite import SqliteDatabase
from tuneloop.errors import StoreError
from tuneloop.postgres import PostgresDatabase

BACKENDS: list[type[Database]] = [PostgresDatabase, SqliteDatabase]


def open_database(url: str | Path) -> Database:
    """The first backend in BACKENDS that accepts `url`, connected."""
    for backend in BACKENDS:
        if backend.accepts(str(url)):
            return backend(str(url))
    raise StoreError(f"no store backend opens {str(url)!r}; give a SQLite file path or a postgresql:// URL")
