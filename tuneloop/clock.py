"""The one timestamp format: ISO 8601 in UTC to the millisecond (`2026-11-29T14:30:00.123+00:00`).

Stored rows are compared as strings (the feedback store's `stored_at > since`), which orders them in
time only while every timestamp has this exact shape: build them here, nowhere else.
"""

from __future__ import annotations

from datetime import UTC, datetime

TIMESPEC = "milliseconds"


def utc_now() -> str:
    """Now, as the stored timestamp format."""
    return datetime.now(UTC).isoformat(timespec=TIMESPEC)


def utc_iso(moment: datetime | float | str) -> str:
    """A moment (aware datetime, unix seconds, or any ISO string with an offset) in the stored format."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    elif not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).isoformat(timespec=TIMESPEC)


def unix_seconds(iso: str) -> float:
    """A stored timestamp as seconds since the epoch."""
    return datetime.fromisoformat(iso).timestamp()
