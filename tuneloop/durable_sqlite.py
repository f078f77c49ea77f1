"""SQLite opened the one way every durable store here needs it."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path, schema: str = "") -> sqlite3.Connection:
    """WAL for concurrent readers across processes; synchronous=FULL, so a returned commit is on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    if schema:
        connection.executescript(schema)
    return connection
