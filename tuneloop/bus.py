"""The event bus: Kafka when configured, else an embedded durable log with the same interface.

Both give at-least-once delivery: `publish` returns only once the message is durable (Kafka:
acks=all from an idempotent producer; embedded: an fsynced SQLite commit), and a consumer's
position moves only when it commits after processing.
"""

from __future__ import annotations

import contextlib
import gc
import math
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneloop.config import EventsConfig
from tuneloop.durable_sqlite import connect
from tuneloop.errors import BusUnavailable, MessageTooLarge
from tuneloop.events import ModelEvent


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class Consumer(Protocol):
    def poll(self, max_records: int, timeout_s: float) -> list[Record]: ...
    def commit(self, records: list[Record]) -> None: ...
    def lag(self) -> dict[tuple[str, int], int]: ...
    def close(self) -> None: ...


Message = tuple[bytes | None, bytes]  # (key, value)

# The largest message (key and value) either bus takes: under Kafka's default max.request.size (1,048,576 bytes),
# with room for the record's framing. The embedded log holds the same line, so nothing works there and fails on Kafka.
MAX_MESSAGE_BYTES = 1_000_000


def too_large(key: bytes | None, value: bytes) -> bool:
    return len(key or b"") + len(value) > MAX_MESSAGE_BYTES


def check_sizes(messages: list[Message]) -> None:
    """Raise MessageTooLarge, before anything is sent, when a message is over MAX_MESSAGE_BYTES."""
    for i, (key, value) in enumerate(messages):
        if too_large(key, value):
            raise MessageTooLarge(f"message {i} is {len(key or b'') + len(value):,} bytes, over the bus's "
                                  f"{MAX_MESSAGE_BYTES:,}-byte message limit")


class Bus(Protocol):
    def ensure_topics(self, topics: Iterable[str]) -> None: ...
    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        """Send in order; True for each message acknowledged as durable within the timeout."""
        ...
    def consumer(self, group: str, topics: list[str], member: str | None = None) -> Consumer:
        """`member`: a static member id (Kafka's group.instance.id) for a group one process at a time consumes in:
        a consumer joining with the id of one that died takes its partitions at once, not after the session
        timeout (45 s), and the dead one's late commits are refused. Never give two live consumers one id."""
        ...
    def prune(self, older_than_unix: float) -> int:
        """Drop messages older than that which every reader has consumed; returns how many."""
        ...
    def close(self) -> None: ...


# -- embedded ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    topic  TEXT NOT NULL,
    key    BLOB,
    value  BLOB NOT NULL,
    time   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_topic ON messages (topic, offset);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    grp    TEXT NOT NULL,
    topic  TEXT NOT NULL,
    next   INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
"""


class EmbeddedBus:
    """A single-partition durable log per topic in one SQLite file, shared by processes on one host."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect(path, _SCHEMA)
        self._lock = threading.Lock()

    def ensure_topics(self, topics: Iterable[str]) -> None:
        return None  # topics exist implicitly

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        check_sizes(messages)
        now = time.time()
        try:
            with self._lock, self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO messages (topic, key, value, time) VALUES (?, ?, ?, ?)",
                    [(topic, key, value, now) for key, value in messages],
                )
        except sqlite3.Error as exc:
            raise BusUnavailable(f"embedded log {self.path}: {exc}") from exc
        return [True] * len(messages)

    def consumer(self, group: str, topics: list[str], member: str | None = None) -> EmbeddedConsumer:
        return EmbeddedConsumer(self.path, group, topics)  # no membership to wait out: offsets in one file

    def prune(self, older_than_unix: float) -> int:
        """Delete messages published before `older_than_unix` that every group committing their topic has passed.
        A topic no group has committed yet keeps everything: a reader may still come for it. Returns how many went."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            return self._db.execute(
                "DELETE FROM messages WHERE time < ? AND offset < "
                "(SELECT MIN(next) FROM consumer_offsets c WHERE c.topic = messages.topic)",
                (older_than_unix,),
            ).rowcount

    def close(self) -> None:
        self._db.close()


class EmbeddedConsumer:
    """Like a Kafka consumer: polling advances an in-memory position, commit makes it durable."""

    def __init__(self, path: Path, group: str, topics: list[str]) -> None:
        self._db = connect(path, _SCHEMA)
        self.group = group
        self.topics = topics
        self._position = self._committed()

    def _committed(self) -> dict[str, int]:
        rows = self._db.execute(
            f"SELECT topic, next FROM consumer_offsets WHERE grp = ? AND topic IN ({','.join('?' * len(self.topics))})",
            (self.group, *self.topics),
        ).fetchall()
        return {topic: 0 for topic in self.topics} | dict(rows)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while True:
            records = []
            for topic, start in self._position.items():
                rows = self._db.execute(
                    "SELECT offset, key, value FROM messages WHERE topic = ? AND offset >= ? ORDER BY offset LIMIT ?",
                    (topic, start, max_records),
                ).fetchall()
                records += [Record(topic, 0, offset, key, value) for offset, key, value in rows]
            records = sorted(records, key=lambda r: r.offset)[:max_records]
            for record in records:
                self._position[record.topic] = max(self._position[record.topic], record.offset + 1)
            if records or time.monotonic() >= deadline:
                return records
            time.sleep(0.05)

    def commit(self, records: list[Record]) -> None:
        latest: dict[str, int] = {}
        for record in records:
            latest[record.topic] = max(latest.get(record.topic, -1), record.offset)
        with self._db:
            for topic, offset in latest.items():
                self._db.execute(
                    "INSERT INTO consumer_offsets (grp, topic, next) VALUES (?, ?, ?) "
                    "ON CONFLICT (grp, topic) DO UPDATE SET next = MAX(next, excluded.next)",
                    (self.group, topic, offset + 1),
                )

    def lag(self) -> dict[tuple[str, int], int]:
        lags = {}
        for topic, start in self._position.items():
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM messages WHERE topic = ? AND offset >= ?", (topic, start)
            ).fetchone()
            lags[(topic, 0)] = count
        return lags

    def close(self) -> None:
        self._db.close()


# -- Kafka ------------------------------------------------------------------------------------


# kafka-python connects eagerly inside its constructors unless it is told the protocol version, waiting up to 30 s
# for a broker that is down, and a constructor that gives up leaks its IO thread and sockets (measured: one thread
# and 3-7 fds per attempt). Clients built with these settings return at once and are closed like any other; the
# broker's API versions are still negotiated on each connection.
KAFKA_CLIENT = {"api_version": (3, 0), "bootstrap_timeout_ms": 2000}


# kafka-python (3.0.12) leaves the socket of a refused connect in a reference cycle (its traceback's frames hold it,
# kafka/net/inet.py), closed only by the cyclic garbage collector. A quiet process rarely runs a full collection,
# so a broker outage of hours would pile up descriptors (one a reconnect, every client) until accept() fails.
# A full collection in a service worker takes ~70 ms (106,000 objects), paid once a minute during an outage.
REAP_INTERVAL_S = 60.0
_reaped_at = -math.inf
_reap_lock = threading.Lock()


def _reap_failed_connects() -> None:
    """Collect reference cycles, at most once per REAP_INTERVAL_S in this process; called when a client finds no
    broker or a publish goes unacknowledged (a timeout too, which costs one collection a minute at most)."""
    global _reaped_at
    with _reap_lock:
        if time.monotonic() - _reaped_at < REAP_INTERVAL_S:
            return
        _reaped_at = time.monotonic()
    gc.collect()


def _reachable(bootstrap_servers: str, timeout_s: float = 2.0) -> bool:
    """Whether any bootstrap server accepts a TCP connection."""
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
            return True
        except (OSError, ValueError):
            continue
    return False


class KafkaBus:
    def __init__(self, bootstrap_servers: str, max_block_ms: int = 2000, replication_factor: int = 1,
                 min_insync_replicas: int = 1) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.max_block_ms = max_block_ms
        self.replication_factor = replication_factor
        self.min_insync_replicas = min_insync_replicas
        self._producer_instance: object | None = None
        self._producer_lock = threading.Lock()

    @property
    def _producer(self) -> Any:
        """Connect on first use, so a process can start (and spool) while the broker is down."""
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        with self._producer_lock:
            if self._producer_instance is None:
                try:
                    self._producer_instance = KafkaProducer(
                        **KAFKA_CLIENT,
                        bootstrap_servers=self.bootstrap_servers,
                        acks="all",
                        enable_idempotence=True,
                        linger_ms=2,
                        max_block_ms=self.max_block_ms,  # how long send() may wait for metadata or buffer space
                        request_timeout_ms=5000,
                        delivery_timeout_ms=30000,
                    )
                except KafkaError as exc:
                    raise BusUnavailable(f"cannot reach Kafka at {self.bootstrap_servers}: {exc!r}") from exc
            return self._producer_instance

    def ensure_topics(self, topics: Iterable[str]) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import KafkaError, TopicAlreadyExistsError

        # The admin client bootstraps in its constructor whatever it is told, and leaks when that fails: look first.
        if not _reachable(self.bootstrap_servers):
            raise BusUnavailable(f"cannot reach Kafka at {self.bootstrap_servers}")
        try:
            admin = KafkaAdminClient(**KAFKA_CLIENT, bootstrap_servers=self.bootstrap_servers)
        except KafkaError as exc:
            raise BusUnavailable(f"cannot reach Kafka at {self.bootstrap_servers}: {exc!r}") from exc
        try:
            missing = set(topics) - set(admin.list_topics())
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):  # another process created it meanwhile
                    admin.create_topics([
                        NewTopic(name, num_partitions=1, replication_factor=self.replication_factor,
                                 topic_configs={"min.insync.replicas": str(self.min_insync_replicas)})
                        for name in missing
                    ])
        finally:
            admin.close()

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        from kafka.errors import KafkaError

        check_sizes(messages)
        deadline = time.monotonic() + timeout_s
        futures = []
        for key, value in messages:
            try:
                futures.append(self._producer.send(topic, value=value, key=key))
            except KafkaError:  # no metadata (broker down) or buffer full: this and the rest are not sent
                break
        acknowledged = []
        for future in futures:
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
                acknowledged.append(True)
            except (KafkaError, TimeoutError):
                acknowledged.append(False)
        acknowledged += [False] * (len(messages) - len(futures))
        if not all(acknowledged):
            _reap_failed_connects()
        return acknowledged

    def consumer(self, group: str, topics: list[str], member: str | None = None) -> KafkaEventConsumer:
        return KafkaEventConsumer(self.bootstrap_servers, group, topics, member=member)

    def prune(self, older_than_unix: float) -> int:
        return 0  # the broker's retention.ms applies

    def tail(self, topic: str) -> KafkaEventConsumer:
        """Messages published from now on, with no consumer group: every listener sees every one."""
        return KafkaEventConsumer(self.bootstrap_servers, None, [topic], offset_reset="latest")

    def close(self) -> None:
        if self._producer_instance is not None:
            self._producer_instance.close(timeout=5)


class KafkaEventConsumer:
    def __init__(
        self, bootstrap_servers: str, group: str | None, topics: list[str], offset_reset: str = "earliest",
        member: str | None = None,
    ) -> None:
        from kafka import KafkaConsumer

        self._consumer = KafkaConsumer(
            *topics,
            **KAFKA_CLIENT,
            bootstrap_servers=bootstrap_servers,
            group_id=group,
            group_instance_id=member,
            enable_auto_commit=False,
            auto_offset_reset=offset_reset,
            isolation_level="read_committed",
        )

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        if not batches and not (self._consumer.metrics() or {}).get("consumer-metrics", {}).get("connection-count", 1):
            _reap_failed_connects()  # no connection to any broker: reconnecting
        return [Record(m.topic, m.partition, m.offset, m.key, m.value)
                for messages in batches.values() for m in messages]

    def commit(self, records: list[Record]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        latest: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            latest[tp] = max(latest.get(tp, -1), record.offset)
        if latest:
            self._consumer.commit({tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in latest.items()})

    def lag(self) -> dict[tuple[str, int], int]:
        # The high watermark arrives with every fetch response; asking the broker (end_offsets)
        # instead costs a blocking round trip of about 0.4 s per call with kafka-python.
        lags = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                lags[(tp.topic, tp.partition)] = max(0, highwater - self._consumer.position(tp))
        return lags

    def close(self) -> None:
        self._consumer.close()


def announce(bus: Bus, topic: str, event: ModelEvent) -> None:
    """Publish a model event; raises BusUnavailable when the bus does not acknowledge it."""
    bus.ensure_topics([topic])
    if not all(bus.publish_many(topic, [(str(event.version).encode(), event.model_dump_json().encode())])):
        raise BusUnavailable(f"{topic} did not acknowledge the {event.action} event of v{event.version}")


def announce_model_event(config: EventsConfig, event: ModelEvent) -> str | None:
    """Tell the replicas on the model topic; returns why the bus did not take it, or None.

    The replicas also watch the registry, so a lost event only delays a swap: the caller warns and goes on."""
    try:
        announce(open_bus(config), config.topics.model, event)
    except Exception as exc:  # noqa: BLE001  (the registry already holds the truth)
        return str(exc)
    return None


def open_bus(config: EventsConfig) -> Bus:
    if config.kafka_bootstrap_servers:
        return KafkaBus(config.kafka_bootstrap_servers, replication_factor=config.replication_factor,
                        min_insync_replicas=config.min_insync_replicas)
    return EmbeddedBus(config.embedded_path)
