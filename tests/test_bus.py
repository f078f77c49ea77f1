"""The embedded log keeps the consumer contract the controller relies on (the Kafka side runs in test_feedback);
Kafka clients with the broker down answer in seconds and leak nothing."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from cli.processes import free_port
from tuneloop import bus as bus_module
from tuneloop.bus import BusUnavailable, EmbeddedBus, KafkaBus


def test_poll_advances_commit_persists_and_uncommitted_records_are_redelivered(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "events.db")
    assert bus.publish_many("t", [(b"k1", b"one"), (None, b"two"), (None, b"three")]) == [True] * 3
    consumer = bus.consumer("g", ["t"])
    first = consumer.poll(2, timeout_s=0.1)
    assert [r.value for r in first] == [b"one", b"two"] and first[0].key == b"k1"
    assert [r.value for r in consumer.poll(10, timeout_s=0.1)] == [b"three"]  # position moved on
    assert consumer.poll(10, timeout_s=0.1) == []
    consumer.commit(first)
    assert consumer.lag() == {("t", 0): 0}
    consumer.close()
    # A new consumer of the group (a restart) resumes after the last commit, so "three" comes again.
    again = bus.consumer("g", ["t"])
    assert again.lag() == {("t", 0): 1}
    assert [r.value for r in again.poll(10, timeout_s=0.1)] == [b"three"]
    # Another group reads everything independently.
    assert len(bus.consumer("other", ["t"]).poll(10, timeout_s=0.1)) == 3


def test_topics_are_separate_and_offsets_ordered(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "events.db")
    bus.publish_many("a", [(None, b"a1")])
    bus.publish_many("b", [(None, b"b1")])
    bus.publish_many("a", [(None, b"a2")])
    records = bus.consumer("g", ["a"]).poll(10, timeout_s=0.1)
    assert [r.value for r in records] == [b"a1", b"a2"]
    assert records[0].offset < records[1].offset


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_with_the_broker_down_kafka_clients_answer_within_seconds_and_leak_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on the port: the broker is down for real. KafkaProducer(...) blocked 30 s (under the bus's lock,
    # holding the first feedback), and every failed admin client or consumer leaked an IO thread and 3-7 fds.
    caplog.set_level(logging.CRITICAL, logger="kafka")  # captured records would hold the failed sockets' tracebacks
    bus = KafkaBus(f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    try:
        acknowledged = bus.publish_many("t", [(None, b"v")], timeout_s=1.0)
    except BusUnavailable:
        acknowledged = [False]
    assert acknowledged == [False] and time.monotonic() - started < 5
    bus.close()
    gc.collect()
    threads, fds = threading.active_count(), open_fds()
    bus = KafkaBus(bus.bootstrap_servers)  # admin clients and consumers only: no producer retrying in the background
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(BusUnavailable, match="cannot reach Kafka"):
            bus.ensure_topics(["t"])
        assert time.monotonic() - started < 5
        consumer = bus.consumer("g", ["t"])
        assert consumer.poll(10, timeout_s=0.2) == []
        consumer.close()
    assert threading.active_count() == threads
    gc.collect()  # a closed consumer's sockets wait in reference cycles for the collector; an IO thread would not
    assert open_fds() == fds
    bus.close()


def test_clients_retrying_through_an_outage_keep_their_descriptors_flat(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # kafka-python leaves each refused connect's socket in a reference cycle. A quiet service rarely runs a full
    # collection (modelled here by turning the collector off), so the outage test's service grew 7 sockets in a
    # minute on CI: one a reconnect, each client, until accept() would fail hours later.
    caplog.set_level(logging.CRITICAL, logger="kafka")
    monkeypatch.setitem(bus_module.KAFKA_CLIENT, "reconnect_backoff_max_ms", 100)  # an hour's reconnects in seconds
    monkeypatch.setattr(bus_module, "REAP_INTERVAL_S", 1.0)
    bus = KafkaBus(f"127.0.0.1:{free_port()}")
    consumer = bus.tail("t")
    gc.collect()
    gc.disable()
    try:
        assert consumer.poll(10, timeout_s=0.5) == [] and bus.publish_many("t", [(None, b"v")], 0.5) == [False]
        fds, grown = open_fds(), []
        for _ in range(8):
            assert consumer.poll(10, timeout_s=0.5) == [] and bus.publish_many("t", [(None, b"v")], 0.5) == [False]
            grown.append(open_fds() - fds)
    finally:
        gc.enable()
        consumer.close()
        bus.close()
    assert max(grown) <= 4, f"sockets grown after each second of retrying: {grown}"
