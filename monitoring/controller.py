"""The controller: consumes prediction and feedback events into the feedback store.

Each polled batch is written in one store transaction; malformed messages and feedback whose
prediction never arrived are sent to the dead-letter topic with a reason; only then are the
offsets committed. A crash anywhere before the commit redelivers the batch, and the store's
keys turn the redelivery into counted duplicates, so nothing is stored twice or lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tuneloop.bus import Bus, Consumer, Record, open_bus
from tuneloop.config import Settings
from tuneloop.events import DeadLetter, FeedbackEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore

log = logging.getLogger("tuneloop.controller")

# Fault injection for tests only: exit right after the store write, before the offset commit.
# A real SIGKILL cannot be aimed at that instant reliably, so the tests simulate the crash there.
FAULT_ENV = "TUNELOOP_CONTROLLER_FAULT"


@dataclass(frozen=True)
class ControllerMetrics:
    consumed: Any
    stored: Any
    duplicates: Any
    dead_lettered: Any
    pending: Any
    lag: Any


def controller_metrics() -> ControllerMetrics:
    import prometheus_client as prom

    return ControllerMetrics(
        consumed=prom.Counter("tuneloop_controller_consumed_total", "Messages consumed, by topic.", ["topic"]),
        stored=prom.Counter("tuneloop_controller_feedback_stored_total", "Feedback rows written to the store."),
        duplicates=prom.Counter(
            "tuneloop_controller_duplicates_skipped_total", "Redelivered or resent feedback that was already stored."
        ),
        dead_lettered=prom.Counter(
            "tuneloop_controller_dead_lettered_total", "Messages sent to the dead-letter topic, by reason.", ["reason"]
        ),
        pending=prom.Gauge("tuneloop_controller_pending_feedback", "Feedback waiting for its prediction to arrive."),
        lag=prom.Gauge("tuneloop_controller_consumer_lag", "Messages not yet consumed.", ["topic", "partition"]),
    )


class Controller:
    def __init__(self, settings: Settings, bus: Bus | None = None, metrics: ControllerMetrics | None = None) -> None:
        self.settings = settings
        self.topics = settings.events.topics
        self.bus = bus or open_bus(settings.events)
        self.store = FeedbackStore(settings.controller.store_path)
        self.metrics = metrics or controller_metrics()
        self.fault = os.environ.get(FAULT_ENV, "")

    def run(self, stop: threading.Event) -> None:
        """Consume until stopped; after any failure, reconnect and resume from the last committed offsets."""
        while not stop.is_set():
            consumer = None
            try:
                self.bus.ensure_topics(self.settings.events.topics.model_dump().values())
                consumer = self.bus.consumer(
                    self.settings.controller.group_id, [self.topics.predictions, self.topics.feedback]
                )
                log.info("controller consuming %s and %s", self.topics.predictions, self.topics.feedback)
                while not stop.is_set():
                    self.step(consumer)
            except Exception as exc:  # broker gone, store locked, dead-letter refused: retry from committed offsets
                log.warning("controller step failed (%r); resuming from committed offsets in 2 s", exc)
                stop.wait(2)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close()

    def step(self, consumer: Consumer) -> int:
        records = consumer.poll(self.settings.controller.poll_max_records, timeout_s=0.5)
        predictions, feedback, dead = [], [], []
        for record in records:
            self.metrics.consumed.labels(record.topic).inc()
            try:
                if record.topic == self.topics.predictions:
                    predictions.append(PredictionEvent.model_validate_json(record.value))
                else:
                    feedback.append(FeedbackEvent.model_validate_json(record.value))
            except ValidationError as exc:
                first = exc.errors()[0]
                reason = f"malformed {record.topic} message: {first['msg']} at {list(first['loc']) or 'top level'}"
                dead.append((record, "malformed", reason))
        result = self.store.write(predictions, feedback)
        if self.fault == "exit-after-write" and records:
            os._exit(17)
        self.metrics.stored.inc(result.stored)
        self.metrics.duplicates.inc(result.duplicates)
        for record, kind, reason in dead:
            self._dead_letter(record.topic, record.value.decode("utf-8", errors="replace"), kind, reason)
        self._expire_pending()
        consumer.commit(records)
        self.metrics.pending.set(self.store.count("pending_feedback"))
        for (topic, partition), lag in consumer.lag().items():
            self.metrics.lag.labels(topic, str(partition)).set(lag)
        return len(records)

    def _expire_pending(self) -> None:
        expired = self.store.expired_pending(self.settings.controller.join_timeout_s)
        for _, payload in expired:
            reason = f"its prediction did not arrive within {self.settings.controller.join_timeout_s:g} s"
            self._dead_letter(self.topics.feedback, payload, "unjoined", reason)
        if expired:
            self.store.drop_pending([feedback_id for feedback_id, _ in expired])

    def _dead_letter(self, topic: str, raw: str, kind: str, reason: str) -> None:
        letter = DeadLetter(topic=topic, reason=reason, raw=raw)
        acknowledged = self.bus.publish_many(self.topics.dead_letter, [(None, letter.model_dump_json().encode())])
        if not all(acknowledged):
            # Not committing keeps the message for a retry rather than losing it.
            raise RuntimeError(f"dead-letter topic {self.topics.dead_letter} did not acknowledge")
        self.metrics.dead_lettered.labels(kind).inc()
        log.warning("dead-lettered a %s message: %s", topic, reason)


def serve_controller(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the controller with its /metrics endpoint until stopped."""
    import prometheus_client as prom

    prom.start_http_server(settings.controller.port, addr=settings.controller.host)
    Controller(settings).run(stop or threading.Event())
