"""Feedback intake in process: label checks, durability on the embedded log, the spool while Kafka is away."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from services.feedback_intake import FeedbackIntake
from services.spool import Spool, SpooledSink, acknowledged_prefix
from services.live_model import LiveModel
from tuneloop.bus import BusUnavailable, EmbeddedBus, KafkaBus, Message
from tuneloop.config import TopicsConfig
from tuneloop.errors import FeedbackRefused, NotDurable, RequestTooLarge
from tuneloop.events import DeadLetter, FeedbackEvent
from tuneloop.registry import Manifest

TOPIC = "tuneloop.feedback"
DEAD = "tuneloop.feedback.dead-letter"


def sink(bus: object, topic: str, dead: str, ack_timeout_s: float, spool: Spool | None, metrics: MagicMock) -> SpooledSink:
    return SpooledSink(bus, topic, dead, ack_timeout_s, spool, metrics.feedback_spooled, metrics.feedback_replayed)  # type: ignore[arg-type]


def live(labels: list[str]) -> LiveModel:
    manifest = Manifest(version=3, created_at="2026-11-29T00:00:00+00:00", base_model="base", labels=labels, files={})
    return LiveModel(3, manifest, MagicMock(), "onnx")


def events(*labels: str) -> list[FeedbackEvent]:
    return [FeedbackEvent(feedback_id=f"f{i}", text="some text", label=label) for i, label in enumerate(labels)]


def test_acknowledged_prefix_stops_at_the_first_miss() -> None:
    assert acknowledged_prefix([True, True, False, True]) == 2
    assert acknowledged_prefix([True, True]) == 2
    assert acknowledged_prefix([False]) == 0


def test_labels_the_served_model_does_not_know_are_named() -> None:
    assert FeedbackIntake.unknown_labels(events("pos", "neg"), live(["neg", "pos"])) is None
    assert FeedbackIntake.unknown_labels(events("pos", "meh", "bad"), live(["neg", "pos"])) == (
        "unknown label(s) ['bad', 'meh']; model v3 knows ['neg', 'pos']"
    )


def test_feedback_on_the_embedded_log_is_durable_when_submitted(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "events.db")
    metrics = MagicMock()
    intake = FeedbackIntake(sink(bus, TOPIC, DEAD, 5.0, None, metrics), metrics)
    accepted = asyncio.run(intake.submit(events("pos", "neg")))
    assert (accepted.accepted, accepted.spooled, accepted.feedback_ids) == (2, 0, ["f0", "f1"])
    records = bus.consumer("reader", [TOPIC]).poll(10, timeout_s=0.1)
    assert [(r.key, FeedbackEvent.model_validate_json(r.value).label) for r in records] == [(b"f0", "pos"), (b"f1", "neg")]
    metrics.feedback_accepted.labels.assert_any_call("bus")
    intake.close()


class Unreachable:
    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        raise BusUnavailable("no broker")


def test_without_a_spool_an_unreachable_bus_refuses_the_feedback() -> None:
    metrics = MagicMock()
    intake = FeedbackIntake(sink(Unreachable(), TOPIC, DEAD, 5.0, None, metrics), metrics)  # type: ignore[arg-type]
    with pytest.raises(FeedbackRefused, match="no broker"):
        asyncio.run(intake.submit(events("pos")))
    intake.close()


class Returning:
    """Acknowledges only the first `acks` messages, until `back` is set; then everything."""

    def __init__(self, acks: int) -> None:
        self.acks = acks
        self.back = threading.Event()
        self.published: list[bytes | None] = []

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        if self.back.is_set():
            self.published += [key for key, _ in messages]
            return [True] * len(messages)
        sent = messages[: self.acks]
        self.published += [key for key, _ in sent]
        self.acks = 0
        return [True] * len(sent) + [False] * (len(messages) - len(sent))


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
    deadline = time.monotonic() + 10
    while len(bus.published) < 4:
        assert time.monotonic() < deadline, "the spool was not replayed"
        time.sleep(0.05)
    assert bus.published == [b"f0", b"f1", b"f2", b"f0"]  # acceptance order ("d" reused id f0 in its own batch)
    intake.close()
    assert not intake.sink._replayer.is_alive()


def test_spooled_feedback_survives_a_close_and_is_replayed_by_the_next_start(tmp_path: Path) -> None:
    metrics = MagicMock()
    spooled = sink(Unreachable(), TOPIC, DEAD, 5.0, Spool(tmp_path / "spool.db"), metrics)
    assert spooled.submit([(b"k", b"v")]) == 1
    spooled.close()
    assert len(Spool(tmp_path / "spool.db")) == 1


def oversized(feedback_id: str) -> FeedbackEvent:
    # Fits serve.max_body_bytes as a request, but not Kafka's 1 MiB max.request.size as a message.
    return FeedbackEvent(feedback_id=feedback_id, text="x" * 1_048_300, label="pos")


def read(bus: KafkaBus, topic: str, expected: int, timeout_s: float = 30) -> list:
    """Records of a topic, from the start, until `expected` came (a consumer of its own group, closed after)."""
    consumer, records = bus.consumer(f"reader-{topic}", [topic]), []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        records += consumer.poll(10, timeout_s=1.0)
    consumer.close()
    return records


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.slow
def test_feedback_kafka_cannot_carry_is_refused_before_acceptance_and_never_blocks_the_spool(
    kafka: object, tmp_path: Path
) -> None:
    # Kafka refused such a record; the sink took the refusal for an outage, spooled it and answered 202, and the
    # replay retried it forever while every later feedback of that worker queued behind it.
    topics = TopicsConfig(feedback=f"intake-{tmp_path.name}", dead_letter=f"intake-dlq-{tmp_path.name}")
    bus = KafkaBus(kafka.bootstrap_servers)
    bus.ensure_topics([topics.feedback, topics.dead_letter])
    spool = Spool(tmp_path / "spool.db")
    huge = oversized("huge").model_dump_json().encode()
    spool.append([(b"huge", huge), (b"after", events("pos")[0].model_dump_json().encode())])  # as an older version did
    metrics = MagicMock()
    intake = FeedbackIntake(sink(bus, topics.feedback, topics.dead_letter, 5.0, spool, metrics), metrics)
    with pytest.raises(RequestTooLarge, match=r"feedback item 0 is 1,048,\d+ bytes .* shorten its text"):
        asyncio.run(intake.submit([oversized("big")]))
    wait_until(lambda: len(spool) == 0, "the spool drained past the oversized record")
    assert asyncio.run(intake.submit(events("neg"))).spooled == 0
    assert [r.key for r in read(bus, topics.feedback, 2)] == [b"after", b"f0"]
    [letter] = [DeadLetter.model_validate_json(r.value) for r in read(bus, topics.dead_letter, 1)]
    assert letter.topic == topics.feedback and "message limit" in letter.reason
    assert letter.raw_bytes == len(huge) and letter.raw_sha256 == hashlib.sha256(huge).hexdigest()
    intake.close()
    bus.close()


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
    deadline = time.monotonic() + 10
    while len(bus.published) < 2:
        assert time.monotonic() < deadline, "the orphaned spool was not replayed"
        time.sleep(0.05)
    own.close()
    assert bus.published == [b"o1", b"o2"] and len(running) == 1
    assert len(Spool(tmp_path / "feedback-worker3.db")) == 0
    running.close()
