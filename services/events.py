"""Getting events out of the service: feedback durably, prediction events without slowing predictions.

Feedback is answered 202 only once it is durable: acknowledged by the bus, or, while Kafka is
unreachable, written to a local spool (SQLite, fsynced) that a background thread replays in
order when the broker returns. While the spool holds anything, new feedback queues behind it,
so the order of acceptance is the order on the topic. A replay after a crash can repeat a
message; the controller's deduplication by feedback_id stores it once.

Prediction events go through a bounded queue drained by a background thread; when it is full
they are dropped and counted. Feedback is never dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneloop.bus import Bus, BusUnavailable, Message
from tuneloop.durable_sqlite import connect
from tuneloop.events import utc_now

log = logging.getLogger("tuneloop.events")

# Per text: its embedding sketch, token count and unknown-token count (the latter two may be None).
DriftInputs = tuple[Sequence[float], int | None, int | None]


class FeedbackRefused(Exception):
    """Nothing durable accepted the feedback; the client must retry."""


def acknowledged_prefix(acknowledged: list[bool]) -> int:
    """How many messages, from the first, were acknowledged before the first miss (acks come in order)."""
    return next((i for i, ok in enumerate(acknowledged) if not ok), len(acknowledged))


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect(path, "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB, value BLOB);")

    def append(self, messages: list[Message]) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO spool (key, value) VALUES (?, ?)", messages)

    def oldest(self, limit: int) -> list[tuple[int, bytes | None, bytes]]:
        return self._db.execute("SELECT seq, key, value FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def remove_through(self, seq: int) -> None:
        self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]


class FeedbackSink:
    def __init__(self, bus: Bus, topic: str, ack_timeout_s: float, spool: Spool | None, metrics: Any) -> None:
        self.bus = bus
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self.spool = spool  # None on the embedded bus: its commit is already local and durable
        self.metrics = metrics
        self._lock = threading.Lock()
        self._wake = threading.Event()
        if spool is not None:
            self.metrics.feedback_spooled.set(len(spool))
            threading.Thread(target=self._replay_forever, name="feedback-replay", daemon=True).start()

    def submit(self, messages: list[Message]) -> int:
        """Make messages durable, in order; return how many went to the spool. Raises FeedbackRefused."""
        with self._lock:
            if self.spool is not None and len(self.spool):
                return self._to_spool(messages)
            try:
                acknowledged = self.bus.publish_many(self.topic, messages, self.ack_timeout_s)
            except BusUnavailable as exc:
                if self.spool is None:
                    raise FeedbackRefused(str(exc)) from exc
                acknowledged = [False] * len(messages)
            # Everything from the first miss on is spooled, keeping the order.
            first_miss = acknowledged_prefix(acknowledged)
            if first_miss == len(messages):
                return 0
            if self.spool is None:
                raise FeedbackRefused(f"the event log did not acknowledge {len(messages) - first_miss} messages")
            return self._to_spool(messages[first_miss:])

    def _to_spool(self, messages: list[Message]) -> int:
        assert self.spool is not None
        self.spool.append(messages)
        self.metrics.feedback_spooled.set(len(self.spool))
        self._wake.set()
        return len(messages)

    def _replay_forever(self) -> None:
        assert self.spool is not None
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while self._replay_once():
                pass

    def _replay_once(self) -> bool:
        """Publish the oldest spooled messages; True when some went out and more may follow."""
        assert self.spool is not None
        batch = self.spool.oldest(500)
        if not batch:
            return False
        try:
            acknowledged = self.bus.publish_many(self.topic, [(key, value) for _, key, value in batch], self.ack_timeout_s)
        except BusUnavailable:
            acknowledged = []
        sent = acknowledged_prefix(acknowledged)
        if sent == 0:
            time.sleep(1.0)  # broker still away
            return False
        with self._lock:
            self.spool.remove_through(batch[sent - 1][0])
            remaining = len(self.spool)
        self.metrics.feedback_spooled.set(remaining)
        self.metrics.feedback_replayed.inc(sent)
        log.info("replayed %d spooled feedback messages, %d left", sent, remaining)
        return remaining > 0


class PredictionPublisher:
    """Bounded, best-effort: a full queue drops the event (counted) rather than slow a prediction.

    Events are serialized on the background thread, off the request path, as the JSON that
    `tuneloop.events.PredictionEvent` validates on the controller's side.
    """

    def __init__(self, bus: Bus, topic: str, capacity: int, metrics: Any) -> None:
        self.bus = bus
        self.topic = topic
        self.metrics = metrics
        self._queue: queue.Queue[tuple[Any, str, DriftInputs, bool, str]] = queue.Queue(maxsize=capacity)
        threading.Thread(target=self._drain_forever, name="prediction-events", daemon=True).start()

    def offer(self, prediction: Any, text: str, drift_inputs: DriftInputs, shadow: bool = False) -> None:
        try:
            self._queue.put_nowait((prediction, text, drift_inputs, shadow, utc_now()))
        except queue.Full:
            self.metrics.prediction_events_dropped.inc()

    @staticmethod
    def _message(prediction: Any, text: str, drift_inputs: DriftInputs, shadow: bool, timestamp: str) -> Message:
        sketch, tokens, unknown_tokens = drift_inputs
        event = {
            "request_id": prediction.request_id,
            "text": text,
            "label": prediction.label,
            "scores": prediction.scores,
            "model_version": prediction.model_version,
            "timestamp": timestamp,
            # Four decimals keep the message small; the drift statistics need no more.
            "sketch": [round(float(x), 4) for x in sketch],
            "tokens": None if tokens is None else int(tokens),
            "unknown_tokens": None if unknown_tokens is None else int(unknown_tokens),
            "shadow": shadow,
        }
        key = f"{prediction.request_id}:shadow" if shadow else prediction.request_id
        return key.encode(), json.dumps(event).encode()

    def _drain_forever(self) -> None:
        while True:
            pending = [self._queue.get()]
            # Gather for a moment: one durable commit per 50 ms instead of one per prediction.
            time.sleep(0.05)
            while len(pending) < 1000:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [self._message(*item) for item in pending]
            try:
                acknowledged = self.bus.publish_many(self.topic, batch, timeout_s=10.0)
            except BusUnavailable:
                acknowledged = [False] * len(batch)
            self.metrics.prediction_events_published.inc(sum(acknowledged))
            lost = len(batch) - sum(acknowledged)
            if lost:
                self.metrics.prediction_events_dropped.inc(lost)
