"""Events into the feedback store; what cannot go there into the dead-letter topic, with its reason.

Each polled batch is written in one store transaction; malformed messages and feedback whose
prediction never arrived are sent to the dead-letter topic with a reason; only then are the
offsets committed. A crash anywhere before the commit redelivers the batch, and the store's
keys turn the redelivery into counted duplicates, so nothing is stored twice or lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import ValidationError

from monitoring.metrics import IngestMetrics
from tuneloop import faults
from tuneloop.bus import Bus, Consumer, Record
from tuneloop.config import ControllerConfig, TopicsConfig
from tuneloop.events import DeadLetter, FeedbackEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore

log = logging.getLogger("tuneloop.controller")

# Fault injection for tests only: exit right after the store write, before the offset commit.
# A real SIGKILL cannot be aimed at that instant reliably, so the tests simulate the crash there.


@dataclass(frozen=True)
class Malformed:
    record: Record
    reason: str


@dataclass(frozen=True)
class Parsed:
    predictions: list[PredictionEvent] = field(default_factory=list)
    feedback: list[FeedbackEvent] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)


def parse(records: list[Record], predictions_topic: str) -> Parsed:
    """Validate each record against its topic's schema; a record that fails says why (its first error)."""
    parsed = Parsed()
    for record in records:
        try:
            if record.topic == predictions_topic:
                parsed.predictions.append(PredictionEvent.model_validate_json(record.value))
            else:
                parsed.feedback.append(FeedbackEvent.model_validate_json(record.value))
        except ValidationError as exc:
            first = exc.errors()[0]
            reason = f"malformed {record.topic} message: {first['msg']} at {list(first['loc']) or 'top level'}"
            parsed.malformed.append(Malformed(record, reason))
    return parsed


class DeadLetters:
    """Publishes to the dead-letter topic; raises when the bus does not acknowledge, so nothing is committed."""

    def __init__(self, bus: Bus, topic: str, metrics: IngestMetrics) -> None:
        self.bus = bus
        self.topic = topic
        self.metrics = metrics

    def send(self, letters: list[DeadLetter], kind: str) -> None:
        """Publish the letters in one batch (each bounded, so the bus always takes it)."""
        if not letters:
            return
        acknowledged = self.bus.publish_many(self.topic, [(None, letter.encoded()) for letter in letters])
        if not all(acknowledged):
            # Not committing keeps the messages for a retry rather than losing them.
            raise RuntimeError(f"dead-letter topic {self.topic} did not acknowledge")
        self.metrics.dead_lettered.labels(kind).inc(len(letters))
        for letter in letters:
            log.warning("dead-lettered a %s message: %s", letter.topic, letter.reason)


@dataclass(frozen=True)
class Ingested:
    records: int  # polled and committed
    predictions: list[PredictionEvent]  # the prediction events among them, for the drift windows


class Ingest:
    def __init__(
        self, config: ControllerConfig, topics: TopicsConfig, bus: Bus, store: FeedbackStore, metrics: IngestMetrics
    ) -> None:
        self.config = config
        self.topics = topics
        self.store = store
        self.metrics = metrics
        self.dead_letters = DeadLetters(bus, topics.dead_letter, metrics)

    def step(self, consumer: Consumer) -> Ingested:
        """Poll one batch; store it, dead-letter what cannot be stored, then commit the offsets."""
        records = consumer.poll(self.config.poll_max_records, timeout_s=0.5)
        for record in records:
            self.metrics.consumed.labels(record.topic).inc()
        parsed = parse(records, self.topics.predictions)
        result = self.store.write(parsed.predictions, parsed.feedback)
        if records:
            faults.point("ingest:stored")  # stored, offsets not yet committed: the redelivery must be recognised
        self.metrics.stored.inc(result.stored)
        self.metrics.duplicates.inc(result.duplicates)
        self.dead_letters.send([DeadLetter.of(bad.record.topic, bad.record.value, bad.reason) for bad in parsed.malformed],
                               "malformed")
        self.expire_pending()
        consumer.commit(records)
        self.metrics.pending.set(self.store.count("pending_feedback"))
        for (topic, partition), lag in consumer.lag().items():
            self.metrics.lag.labels(topic, str(partition)).set(lag)
        return Ingested(len(records), parsed.predictions)

    def expire_pending(self) -> None:
        """Dead-letter feedback whose prediction did not arrive within the join timeout."""
        expired = self.store.expired_pending(self.config.join_timeout_s)
        reason = f"its prediction did not arrive within {self.config.join_timeout_s:g} s"
        self.dead_letters.send([DeadLetter.of(self.topics.feedback, payload.encode(), reason) for _, payload in expired],
                               "unjoined")
        if expired:
            self.store.drop_pending([feedback_id for feedback_id, _ in expired])
