"""Feedback intake: labels checked against the served model, then made durable before the 202.

Feedback is answered 202 only once it is durable: acknowledged by the bus, or, while Kafka is
unreachable, written to a local spool (SQLite, fsynced) that a background thread replays in
order when the broker returns. While the spool holds anything, new feedback queues behind it,
so the order of acceptance is the order on the topic. A replay after a crash can repeat a
message; the controller's deduplication by feedback_id stores it once. Feedback is never dropped.

Feedback no bus could ever carry (over `MAX_MESSAGE_BYTES`) is refused with a 413 before it is
accepted. A spooled record over the limit (written by an older version) goes to the dead-letter
topic with the reason, so that it never blocks the feedback queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.live_model import LiveModel
from services.metrics import ServiceMetrics
from services.schemas import FeedbackAccepted
from tuneloop.bus import MAX_MESSAGE_BYTES, Bus, BusUnavailable, Message
from tuneloop.durable_sqlite import connect
from tuneloop.errors import FeedbackRefused, RequestTooLarge
from tuneloop.events import DeadLetter, FeedbackEvent

log = logging.getLogger("tuneloop.events")

__all__ = ["FeedbackIntake", "FeedbackRefused", "FeedbackSink", "Spool", "acknowledged_prefix"]


def too_large(key: bytes | None, value: bytes) -> bool:
    return len(key or b"") + len(value) > MAX_MESSAGE_BYTES


def acknowledged_prefix(acknowledged: list[bool]) -> int:
    """How many messages, from the first, were acknowledged before the first miss (acks come in order)."""
    return next((i for i, ok in enumerate(acknowledged) if not ok), len(acknowledged))


SPOOL_SCHEMA = "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB, value BLOB);"


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = connect(path, SPOOL_SCHEMA)
        except sqlite3.DatabaseError as exc:  # a corrupt file must not stop the worker; keep it for a person to read
            kept = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            path.rename(kept)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            log.error("feedback spool %s is unreadable (%s); moved to %s, starting an empty one", path, exc, kept)
            self._db = connect(path, SPOOL_SCHEMA)

    def append(self, messages: list[Message]) -> None:
        """Raises sqlite3.OperationalError when the disk (or the database) is full."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO spool (key, value) VALUES (?, ?)", messages)

    def oldest(self, limit: int) -> list[tuple[int, bytes | None, bytes]]:
        """Read under the sink's lock, like every write, so a batch never interleaves with an append."""
        return self._db.execute("SELECT seq, key, value FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def remove_through(self, seq: int) -> None:
        self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class FeedbackSink:
    def __init__(self, bus: Bus, topic: str, dead_letter_topic: str, ack_timeout_s: float, spool: Spool | None,
                 metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.ack_timeout_s = ack_timeout_s
        self.spool = spool  # None on the embedded bus: its commit is already local and durable
        self.metrics = metrics
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._replayer: threading.Thread | None = None
        if spool is not None:
            self.metrics.feedback_spooled.set(len(spool))
            self._replayer = threading.Thread(target=self._replay_forever, name="feedback-replay", daemon=True)
            self._replayer.start()

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
            try:
                return self._to_spool(messages[first_miss:])
            except FeedbackRefused as exc:
                if not first_miss:
                    raise
                taken = ", ".join((key or b"").decode() for key, _ in messages[:first_miss])
                raise FeedbackRefused(f"{exc}; the first {first_miss} item(s) were accepted (feedback_ids {taken}); "
                                      "resend the rest") from exc

    def _to_spool(self, messages: list[Message]) -> int:
        assert self.spool is not None
        try:
            self.spool.append(messages)
        except sqlite3.OperationalError as exc:  # a full disk: nothing durable took it, the client must retry
            raise FeedbackRefused(f"the bus is unreachable and the local spool cannot take it ({exc})") from exc
        self.metrics.feedback_spooled.set(len(self.spool))
        self._wake.set()
        return len(messages)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop replaying; what is still spooled stays on disk and is replayed by the next start."""
        self._stopped.set()
        self._wake.set()
        if self._replayer is not None:
            self._replayer.join(timeout_s)
        if self.spool is not None and not (self._replayer and self._replayer.is_alive()):
            with self._lock:
                self.spool.close()

    def _replay_forever(self) -> None:
        assert self.spool is not None
        while not self._stopped.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._stopped.is_set() and self._replay_once():
                pass

    def _replay_once(self) -> bool:
        """Publish the oldest spooled messages; True when some went out and more may follow."""
        assert self.spool is not None
        with self._lock:
            batch = self.spool.oldest(500)
        if not batch:
            return False
        deliverable = next((i for i, (_, key, value) in enumerate(batch) if too_large(key, value)), len(batch))
        if deliverable == 0:
            return self._dead_letter_head(batch[0])
        try:
            acknowledged = self.bus.publish_many(
                self.topic, [(key, value) for _, key, value in batch[:deliverable]], self.ack_timeout_s
            )
        except BusUnavailable:
            acknowledged = []
        sent = acknowledged_prefix(acknowledged)
        if sent == 0:
            self._stopped.wait(1.0)  # broker still away
            return False
        with self._lock:
            self.spool.remove_through(batch[sent - 1][0])
            remaining = len(self.spool)
        self.metrics.feedback_spooled.set(remaining)
        self.metrics.feedback_replayed.inc(sent)
        log.info("replayed %d spooled feedback messages, %d left", sent, remaining)
        return remaining > 0

    def _dead_letter_head(self, head: tuple[int, bytes | None, bytes]) -> bool:
        """Move a spooled message no bus can carry to the dead-letter topic; True once it left the spool."""
        seq, key, value = head
        reason = f"{len(value):,} bytes, over the bus's {MAX_MESSAGE_BYTES:,}-byte message limit (spooled by an older version)"
        letter = DeadLetter.of(self.topic, value, reason)
        try:
            acknowledged = self.bus.publish_many(self.dead_letter_topic, [(key, letter.encoded())], self.ack_timeout_s)
        except BusUnavailable:
            acknowledged = [False]
        if not acknowledged[0]:
            self._stopped.wait(1.0)
            return False
        with self._lock:
            self.spool.remove_through(seq)
        log.warning("dead-lettered spooled feedback %r: %s", key, reason)
        return True


class FeedbackIntake:
    """Checks feedback against the served model's labels and makes it durable, off the event loop."""

    def __init__(self, sink: FeedbackSink, metrics: ServiceMetrics) -> None:
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
        spooled = await loop.run_in_executor(self._executor, self.sink.submit, messages)
        self.metrics.feedback_accepted.labels("bus").inc(len(events) - spooled)
        self.metrics.feedback_accepted.labels("spool").inc(spooled)
        return FeedbackAccepted(accepted=len(events), spooled=spooled, feedback_ids=[e.feedback_id for e in events])

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish the submissions accepted so far (each bounded by the ack timeout), then stop the spool's replay."""
        self._executor.shutdown(wait=True)
        self.sink.close(timeout_s)
