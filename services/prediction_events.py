"""Prediction events out of the service, without slowing predictions.

Prediction events go through a bounded queue drained by a background thread into a spooled sink
(`services.spool`): while Kafka is away they wait in the worker's spool, because feedback that
names their request_id is joined with them. When the queue is full they are dropped and counted.
Closing the publisher sends what is queued, then stops it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from services.metrics import ServiceMetrics
from services.spool import SpooledSink
from tuneloop.bus import Message
from tuneloop.errors import NotDurable
from tuneloop.events import utc_now

log = logging.getLogger("tuneloop.events")

# Per text: its embedding sketch, token count and unknown-token count (the latter two may be None).
DriftInputs = tuple[Sequence[float], int | None, int | None]
_Item = tuple[Any, str, DriftInputs, bool, str]


class PredictionPublisher:
    """Bounded, best-effort: a full queue drops the event (counted) rather than slow a prediction.

    Events are serialized on the background thread, off the request path, as the JSON that
    `tuneloop.events.PredictionEvent` validates on the controller's side.
    """

    def __init__(self, sink: SpooledSink, capacity: int, metrics: ServiceMetrics) -> None:
        self.sink = sink
        self.metrics = metrics
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=capacity)  # None: close after what came before
        self._drainer = threading.Thread(target=self._drain_forever, name="prediction-events", daemon=True)
        self._drainer.start()

    def offer(self, prediction: Any, text: str, drift_inputs: DriftInputs, shadow: bool = False) -> None:
        try:
            self._queue.put_nowait((prediction, text, drift_inputs, shadow, utc_now()))
        except queue.Full:
            self.metrics.prediction_events_dropped.inc()

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish what is queued and stop; gives up after about `timeout_s` (a bus that does not answer)."""
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("prediction events still queued at shutdown were not published")
            return
        self._drainer.join(max(0.0, deadline - time.monotonic()))
        self.sink.close(max(0.5, deadline - time.monotonic()))

    @staticmethod
    def _message(prediction: Any, text: str, drift_inputs: DriftInputs, shadow: bool, timestamp: str) -> Message:
        sketch, tokens, unknown_tokens = drift_inputs
        event = {
            "request_id": prediction.request_id,
            "text": text,
            "label": prediction.top_label,  # what the model made of the text, answered or abstained
            "abstained": prediction.abstained,
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
        closing = False
        while not closing:
            pending = [self._queue.get()]
            # Gather for a moment: one durable commit per 50 ms instead of one per prediction.
            time.sleep(0.05)
            while len(pending) < 1000:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = any(item is None for item in pending)
            items = [item for item in pending if item is not None]
            if items:
                self._publish(items)

    def _publish(self, items: list[_Item]) -> None:
        batch = [self._message(*item) for item in items]
        try:
            spooled = self.sink.submit(batch)
        except NotDurable as exc:  # the embedded log refused, or the spool is full
            self.metrics.prediction_events_dropped.inc(len(batch))
            log.warning("%d prediction events dropped: %s", len(batch), exc)
            return
        self.metrics.prediction_events_published.inc(len(batch) - spooled)
