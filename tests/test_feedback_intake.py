"""services/feedback_intake.py in process: label checks, durability on the embedded log, refusal without a spool,
feedback Kafka cannot carry (the spool itself: test_spool.py)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from services.feedback_intake import FeedbackIntake
from services.live_model import LiveModel
from services.spool import Spool
from tests.support.buses import DEAD, TOPIC, Unreachable, sink
from tests.support.processes import wait_for
from tuneloop.bus import EmbeddedBus, KafkaBus
from tuneloop.config import TopicsConfig
from tuneloop.errors import FeedbackRefused, RequestTooLarge
from tuneloop.events import DeadLetter, FeedbackEvent
from tuneloop.registry import Manifest


def live(labels: list[str]) -> LiveModel:
    manifest = Manifest(version=3, created_at="2026-11-29T00:00:00+00:00", base_model="base", labels=labels, files={})
    return LiveModel(3, manifest, MagicMock(), "onnx")


def events(*labels: str) -> list[FeedbackEvent]:
    return [FeedbackEvent(feedback_id=f"f{i}", text="some text", label=label) for i, label in enumerate(labels)]


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


def test_without_a_spool_an_unreachable_bus_refuses_the_feedback() -> None:
    metrics = MagicMock()
    intake = FeedbackIntake(sink(Unreachable(), TOPIC, DEAD, 5.0, None, metrics), metrics)  # type: ignore[arg-type]
    with pytest.raises(FeedbackRefused, match="no broker"):
        asyncio.run(intake.submit(events("pos")))
    intake.close()


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
    wait_for(lambda: len(spool) == 0, 30, "the spool to drain past the oversized record")
    assert asyncio.run(intake.submit(events("neg"))).spooled == 0
    assert [r.key for r in read(bus, topics.feedback, 2)] == [b"after", b"f0"]
    [letter] = [DeadLetter.model_validate_json(r.value) for r in read(bus, topics.dead_letter, 1)]
    assert letter.topic == topics.feedback and "message limit" in letter.reason
    assert letter.raw_bytes == len(huge) and letter.raw_sha256 == hashlib.sha256(huge).hexdigest()
    intake.close()
    bus.close()


