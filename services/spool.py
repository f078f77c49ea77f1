"""Messages made durable before they are acknowledged to a caller: by the bus, or by a local spool while it is away.

Used for feedback (its 202 waits for durability) and for prediction events (which feedback joins by
request_id, so a prediction made while Kafka is down must reach the controller too). The spool is
SQLite, fsynced, one file per worker; a background thread replays it in order when the broker
returns, and while it holds anything new messages queue behind it, so the order of acceptance is
the order on the topic. A replay after a crash can repeat a message; the controller's keys store it
once. A message no bus could carry (over `MAX_MESSAGE_BYTES`, spooled by an older version) goes to
the dead-letter topic with the reason, so that it never blocks the messages behind it.
"""

from __future__ import annotations

import fcntl
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from prometheus_client import Counter, Gauge

from tuneloop.bus import MAX_MESSAGE_BYTES, Bus, BusUnavailable, Message, too_large
from tuneloop.durable_sqlite import connect
from tuneloop.errors import NotDurable
from tuneloop.events import DeadLetter

log = logging.getLogger("tuneloop.events")

ADOPT_INTERVAL_S = 30.0  # how often a worker with an empty spool looks for spools whose worker is not running


def acknowledged_prefix(acknowledged: list[bool]) -> int:
    """How many messages, from the first, were acknowledged before the first miss (acks come in order)."""
    return next((i for i, ok in enumerate(acknowledged) if not ok), len(acknowledged))


SPOOL_SCHEMA = "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB, value BLOB);"


class Spool:
    """One worker's spool file, owned through a lock held while the worker runs (`<file>.owner`, flock)."""

    def __init__(self, path: Path, owner: IO[bytes] | None = None) -> None:
        self.path = path
        self._owner = owner or _own(path, wait_s=OWNER_WAIT_S)
        try:
            self._db = connect(path, SPOOL_SCHEMA)
        except sqlite3.DatabaseError as exc:  # a corrupt file must not stop the worker; keep it for a person to read
            kept = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            path.rename(kept)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            log.error("spool %s is unreadable (%s); moved to %s, starting an empty one", path, exc, kept)
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
        if self._owner is not None:
            self._owner.close()  # releases the lock

    def orphans(self) -> Iterator[Spool]:
        """Spools of this kind whose worker is not running (the service came back with fewer), not empty."""
        pattern = re.sub(r"\d+\.db$", "*.db", self.path.name)
        for path in sorted(self.path.parent.glob(pattern)):
            if path == self.path:
                continue
            owner = _own(path, wait_s=0)
            if owner is None:
                continue  # its worker is running
            orphan = Spool(path, owner)
            if len(orphan):
                yield orphan
            orphan.close()


# A worker that restarts waits this long for its predecessor (same index) to let go of the spool.
OWNER_WAIT_S = 15.0


def _own(path: Path, wait_s: float) -> IO[bytes] | None:
    """Lock the spool's owner file; None when another process holds it beyond `wait_s` (the lock then stays unheld,
    which only lets an adopter replay it too: the controller stores a repeated message once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.with_name(path.name + ".owner").open("ab")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                if wait_s:
                    log.warning("spool %s is still held by another process; using it anyway", path)
                return None
            time.sleep(0.1)


class SpooledSink:
    """Messages made durable in order: acknowledged by the bus or, while it is away, appended to the spool and
    replayed by a background thread. While the spool holds anything, new messages queue behind it."""

    def __init__(self, bus: Bus, topic: str, dead_letter_topic: str, ack_timeout_s: float, spool: Spool | None,
                 spooled: Gauge, replayed: Counter) -> None:
        self.bus = bus
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.ack_timeout_s = ack_timeout_s
        self.spool = spool  # None on the embedded bus: its commit is already local and durable
        self.spooled = spooled  # messages waiting in the spool
        self.replayed = replayed  # messages the replay delivered
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._replayer: threading.Thread | None = None
        if spool is not None:
            self.spooled.set(len(spool))
            self._replayer = threading.Thread(target=self._replay_forever, name=f"replay-{topic}", daemon=True)
            self._replayer.start()

    def submit(self, messages: list[Message]) -> int:
        """Make messages durable, in order; return how many went to the spool. Raises NotDurable."""
        with self._lock:
            if self.spool is not None and len(self.spool):
                return self._to_spool(messages)
            try:
                acknowledged = self.bus.publish_many(self.topic, messages, self.ack_timeout_s)
            except BusUnavailable as exc:
                if self.spool is None:
                    raise NotDurable(str(exc)) from exc
                acknowledged = [False] * len(messages)
            # Everything from the first miss on is spooled, keeping the order.
            first_miss = acknowledged_prefix(acknowledged)
            if first_miss == len(messages):
                return 0
            if self.spool is None:
                raise NotDurable(f"the event log did not acknowledge {len(messages) - first_miss} messages")
            try:
                return self._to_spool(messages[first_miss:])
            except NotDurable as exc:
                if not first_miss:
                    raise
                taken = ", ".join((key or b"").decode() for key, _ in messages[:first_miss])
                raise NotDurable(f"{exc}; the first {first_miss} item(s) were accepted (keys {taken}); "
                                      "resend the rest") from exc

    def _to_spool(self, messages: list[Message]) -> int:
        assert self.spool is not None
        try:
            self.spool.append(messages)
        except sqlite3.OperationalError as exc:  # a full disk: nothing durable took it, the client must retry
            raise NotDurable(f"the bus is unreachable and the local spool cannot take it ({exc})") from exc
        self.spooled.set(len(self.spool))
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
        next_adoption = 0.0
        while not self._stopped.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._stopped.is_set() and self._replay_once(self.spool):
                pass
            if time.monotonic() >= next_adoption and not len(self.spool):
                next_adoption = time.monotonic() + ADOPT_INTERVAL_S
                self._adopt_orphans()

    def _adopt_orphans(self) -> None:
        assert self.spool is not None
        for orphan in self.spool.orphans():
            log.info("replaying %s, left by a worker that is not running", orphan.path)
            try:
                while not self._stopped.is_set() and self._replay_once(orphan):
                    pass
            finally:
                orphan.close()

    def _replay_once(self, spool: Spool) -> bool:
        """Publish the oldest messages of a spool; True when some went out and more may follow."""
        with self._lock:
            batch = spool.oldest(500)
        if not batch:
            return False
        deliverable = next((i for i, (_, key, value) in enumerate(batch) if too_large(key, value)), len(batch))
        if deliverable == 0:
            return self._dead_letter_head(spool, batch[0])
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
            spool.remove_through(batch[sent - 1][0])
            remaining = len(spool)
        if spool is self.spool:
            self.spooled.set(remaining)
        self.replayed.inc(sent)
        log.info("replayed %d spooled %s messages, %d left", sent, self.topic, remaining)
        return remaining > 0

    def _dead_letter_head(self, spool: Spool, head: tuple[int, bytes | None, bytes]) -> bool:
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
            spool.remove_through(seq)
        log.warning("dead-lettered a spooled %s message %r: %s", self.topic, key, reason)
        return True
