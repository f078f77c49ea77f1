"""Feedback intake: labels checked against the served model, then made durable before the 202.

Feedback is answered 202 only once it is durable (`services.spool.SpooledSink`: acknowledged by
the bus, or spooled while Kafka is unreachable). Feedback is never dropped. Feedback no bus could
ever carry (over `MAX_MESSAGE_BYTES`) is refused with a 413 before it is accepted.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from services.live_model import LiveModel
from services.metrics import ServiceMetrics
from services.schemas import FeedbackAccepted
from services.spool import SpooledSink
from tuneloop.bus import MAX_MESSAGE_BYTES, too_large
from tuneloop.errors import FeedbackRefused, NotDurable, RequestTooLarge
from tuneloop.events import FeedbackEvent


class FeedbackIntake:
    """Checks feedback against the served model's labels and makes it durable, off the event loop."""

    def __init__(self, sink: SpooledSink, metrics: ServiceMetrics) -> None:
        self.sink = sink
        self.metrics = metrics
        # Waiting for broker acks happens here, never on the threads that run predictions.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")

    @staticmethod
    def unknown_labels(events: list[FeedbackEvent], live: LiveModel) -> str | None:
        """Why the model cannot take these labels, or None when it knows them all."""
        unknown = sorted({event.label for event in events} - set(live.manifest.labels))
        if unknown:
            return f"unknown label(s) {unknown}; model v{live.version} knows {live.manifest.labels}"
        return None

    async def submit(self, events: list[FeedbackEvent]) -> FeedbackAccepted:
        """Durable once this returns; raises FeedbackRefused when nothing durable took it."""
        messages = [(event.feedback_id.encode(), event.model_dump_json().encode()) for event in events]
        for i, (key, value) in enumerate(messages):
            if too_large(key, value):
                raise RequestTooLarge(
                    f"feedback item {i} is {len(key) + len(value):,} bytes as a message, over the bus's "
                    f"{MAX_MESSAGE_BYTES:,}-byte limit; shorten its text (the model reads only its first tokens)"
                )
        loop = asyncio.get_running_loop()
        try:
            spooled = await loop.run_in_executor(self._executor, self.sink.submit, messages)
        except NotDurable as exc:
            raise FeedbackRefused(str(exc)) from exc
        self.metrics.feedback_accepted.labels("bus").inc(len(events) - spooled)
        self.metrics.feedback_accepted.labels("spool").inc(spooled)
        return FeedbackAccepted(accepted=len(events), spooled=spooled, feedback_ids=[e.feedback_id for e in events])

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish the submissions accepted so far (each bounded by the ack timeout), then stop the spool's replay."""
        self._executor.shutdown(wait=True)
        self.sink.close(timeout_s)
