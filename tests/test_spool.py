"""services/spool.py: what the bus does not acknowledge is spooled in acceptance order and replayed; a spool
survives restarts, corruption, a full disk and a worker that no longer runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from services.feedback_intake import FeedbackIntake
from services.spool import Spool, acknowledged_prefix
from tests.support.buses import DEAD, TOPIC, Returning, Unreachable, sink
from tests.support.processes import wait_for
from tuneloop.errors import FeedbackRefused, NotDurable
from tuneloop.events import FeedbackEvent


def events(*labels: str) -> list[FeedbackEvent]:
    return [FeedbackEvent(feedback_id=f"f{i}", text="some text", label=label) for i, label in enumerate(labels)]


def test_acknowledged_prefix_stops_at_the_first_miss() -> None:
    assert acknowledged_prefix([True, True, False, True]) == 2
    assert acknowledged_prefix([True, True]) == 2
    assert acknowledged_prefix([False]) == 0


def test_what_the_broker_misses_is_spooled_in_order_then_replayed_and_close_stops_the_replay(tmp_path: Path) -> None:
    bus = Returning(acks=1)
    metrics = MagicMock()
    spool = Spool(tmp_path / "spool.db")
    intake = FeedbackIntake(sink(bus, TOPIC, DEAD, 5.0, spool, metrics), metrics)  # type: ignore[arg-type]
    accepted = asyncio.run(intake.submit(events("a", "b", "c")))
    assert (accepted.accepted, accepted.spooled) == (3, 2)
    later = asyncio.run(intake.submit(events("d")))  # queues behind the spool, even though nothing failed now
    assert later.spooled == 1
    bus.back.set()
    wait_for(lambda: len(bus.published) >= 4, 10, "the spool to be replayed", interval=0.05)
    assert bus.published == [b"f0", b"f1", b"f2", b"f0"]  # acceptance order ("d" reused id f0 in its own batch)
    intake.close()
    assert not intake.sink._replayer.is_alive()


def test_spooled_feedback_survives_a_close_and_is_replayed_by_the_next_start(tmp_path: Path) -> None:
    metrics = MagicMock()
    spooled = sink(Unreachable(), TOPIC, DEAD, 5.0, Spool(tmp_path / "spool.db"), metrics)
    assert spooled.submit([(b"k", b"v")]) == 1
    spooled.close()
    assert len(Spool(tmp_path / "spool.db")) == 1


def test_a_corrupt_spool_file_is_set_aside_and_the_worker_starts(tmp_path: Path) -> None:
    # A worker whose spool file was corrupt crashed at start, again on every restart.
    path = tmp_path / "feedback-worker1.db"
    path.write_bytes(b"this is not a database" * 100)
    spool = Spool(path)
    spool.append([(b"k", b"v")])
    assert len(spool) == 1
    [kept] = tmp_path.glob("feedback-worker1.db.corrupt-*")
    assert kept.read_bytes().startswith(b"this is not a database")


def test_a_full_spool_refuses_with_a_503_naming_what_the_bus_already_took(tmp_path: Path) -> None:
    # A full disk answered 500, and a client retrying a batch without feedback_ids duplicated what the bus had taken.
    # SQLite's page limit raises the same SQLITE_FULL error a full disk does (a full disk cannot be made here safely).
    spool = Spool(tmp_path / "spool.db")
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages}")
    metrics = MagicMock()
    full = sink(Returning(acks=1), TOPIC, DEAD, 5.0, spool, metrics)
    big = [(f"f{i}".encode(), b"x" * 5000) for i in range(3)]
    with pytest.raises(NotDurable, match=r"the first 1 item\(s\) were accepted \(keys f0\); resend the rest"):
        full.submit(big)
    assert NotDurable.http_status == FeedbackRefused.http_status == 503
    full.close()


def test_a_spool_left_by_a_worker_no_longer_running_is_adopted_and_drained(tmp_path: Path) -> None:
    # After the service restarted with fewer workers, the spools of the missing indices were never replayed.
    left = Spool(tmp_path / "feedback-worker3.db")  # worker 3 spooled, then the service came back with 2 workers
    left.append([(b"o1", b"v1"), (b"o2", b"v2")])
    left.close()
    running = Spool(tmp_path / "feedback-worker2.db")  # worker 2 is up: its spool is its own
    running.append([(b"r1", b"v")])
    bus = Returning(acks=0)
    bus.back.set()
    own = sink(bus, TOPIC, DEAD, 5.0, Spool(tmp_path / "feedback-worker1.db"), MagicMock())
    wait_for(lambda: len(bus.published) >= 2, 10, "the orphaned spool to be replayed", interval=0.05)
    own.close()
    assert bus.published == [b"o1", b"o2"] and len(running) == 1
    assert len(Spool(tmp_path / "feedback-worker3.db")) == 0
    running.close()
