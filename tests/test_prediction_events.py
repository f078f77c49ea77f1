"""Prediction events out of the service: their message, the bounded queue, and the flush on close."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np

from services.prediction_events import PredictionPublisher
from services.schemas import Prediction
from services.spool import Spool, SpooledSink
from tests.support.processes import wait_for
from tuneloop.bus import Bus, BusUnavailable, EmbeddedBus, Message
from tuneloop.events import PredictionEvent

TOPIC = "tuneloop.predictions"
DEAD = "tuneloop.feedback.dead-letter"


def publisher(bus: Bus, capacity: int, metrics: MagicMock, spool: Spool | None = None) -> PredictionPublisher:
    sink = SpooledSink(bus, TOPIC, DEAD, 5.0, spool, metrics.prediction_events_spooled, metrics.prediction_events_replayed)
    return PredictionPublisher(sink, capacity, metrics)
INPUTS = (np.zeros(2, dtype=np.float32), 5, 0)


def prediction(request_id: str) -> Prediction:
    return Prediction(request_id=request_id, label="a", top_label="a", abstained=False, scores={"a": 1.0},
                      model_version=1)


def test_prediction_events_match_the_schema_the_controller_validates(tmp_path: Path) -> None:
    prediction = Prediction(request_id="r1", label="positive", top_label="positive", abstained=False,
                            scores={"negative": 0.1, "positive": 0.9}, model_version=3)
    drift_inputs = (np.array([0.123456, -1.0], dtype=np.float32), np.int64(7), np.int64(1))
    key, value = PredictionPublisher._message(prediction, "a fine film", drift_inputs, False, "2026-11-23T00:00:00.000+00:00")
    event = PredictionEvent.model_validate_json(value)
    assert key == b"r1"
    assert (event.text, event.label, event.model_version, event.scores["positive"]) == ("a fine film", "positive", 3, 0.9)
    assert (event.sketch, event.tokens, event.unknown_tokens, event.shadow) == ([0.1235, -1.0], 7, 1, False)
    # A shadow score keeps the served request's id in the event, under its own message key.
    key, value = PredictionPublisher._message(prediction, "a fine film", drift_inputs, True, "2026-11-23T00:00:00.000+00:00")
    assert key == b"r1:shadow" and PredictionEvent.model_validate_json(value).shadow


def test_close_publishes_what_is_queued_and_stops(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "events.db")
    metrics = MagicMock()
    events = publisher(bus, 100, metrics)
    for i in range(30):
        events.offer(prediction(f"r{i}"), "text", INPUTS)
    events.close(timeout_s=10)
    assert not events._drainer.is_alive()
    records = bus.consumer("reader", [TOPIC]).poll(100, timeout_s=0.1)
    assert [PredictionEvent.model_validate_json(r.value).request_id for r in records] == [f"r{i}" for i in range(30)]
    assert sum(c.args[0] for c in metrics.prediction_events_published.inc.call_args_list) == 30


class BlockedBus:
    """Holds every publish until released; then the bus is unavailable."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        self.release.wait(10)
        raise BusUnavailable("down")


def test_a_full_queue_drops_and_counts_and_an_unavailable_bus_counts_the_lost_batch() -> None:
    bus = BlockedBus()
    metrics = MagicMock()
    events = publisher(bus, 2, metrics)  # type: ignore[arg-type]
    events.offer(prediction("r0"), "text", INPUTS)  # taken by the drain thread, which then blocks on the bus
    while not events._queue.empty():
        time.sleep(0.01)
    for i in range(1, 5):
        events.offer(prediction(f"r{i}"), "text", INPUTS)  # two fit, two are dropped
    assert metrics.prediction_events_dropped.inc.call_count == 2
    bus.release.set()
    events.close(timeout_s=10)
    dropped = [c.args[0] if c.args else 1 for c in metrics.prediction_events_dropped.inc.call_args_list]
    assert sum(dropped) == 5  # two at the queue, three lost with the bus


class Away:
    """Kafka away until `back` is set; then it acknowledges everything."""

    def __init__(self) -> None:
        self.back = threading.Event()
        self.published: list[bytes | None] = []

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        if not self.back.is_set():
            raise BusUnavailable("no broker")
        self.published += [key for key, _ in messages]
        return [True] * len(messages)


def test_predictions_made_while_kafka_is_away_are_spooled_and_replayed_in_order(tmp_path: Path) -> None:
    # They were dropped: feedback naming them then waited for a join that never came and was dead-lettered.
    bus, metrics = Away(), MagicMock()
    events = publisher(bus, 100, metrics, Spool(tmp_path / "predictions.db"))  # type: ignore[arg-type]
    for i in range(20):
        events.offer(prediction(f"r{i}"), "text", INPUTS)
    wait_for(lambda: len(events.sink.spool) >= 20, 10, "the events to be spooled", interval=0.05)
    assert metrics.prediction_events_dropped.inc.call_count == 0
    bus.back.set()
    wait_for(lambda: len(bus.published) >= 20, 10, "the spool to be replayed", interval=0.05)
    assert bus.published == [f"r{i}".encode() for i in range(20)]
    events.close(timeout_s=5)
