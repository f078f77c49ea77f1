"""Buses that fail on purpose, and the feedback sink over them: the in-process spool and intake tests' fakes.

A broker that takes only part of a batch, or none of it, cannot be produced on cue with a real one; the
Kafka tests (test_feedback.py) show the same paths on a real broker killed and restarted."""

from __future__ import annotations

import threading
from unittest.mock import MagicMock

from services.spool import Spool, SpooledSink
from tuneloop.bus import BusUnavailable, Message

TOPIC = "tuneloop.feedback"
DEAD = "tuneloop.feedback.dead-letter"


def sink(bus: object, topic: str, dead: str, ack_timeout_s: float, spool: Spool | None, metrics: MagicMock) -> SpooledSink:
    return SpooledSink(bus, topic, dead, ack_timeout_s, spool, metrics.feedback_spooled, metrics.feedback_replayed)  # type: ignore[arg-type]


class Unreachable:
    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        raise BusUnavailable("no broker")


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
