"""The embedded log keeps the consumer contract the controller relies on (the Kafka side runs in test_feedback)."""

from __future__ import annotations

from pathlib import Path

from tuneloop.bus import EmbeddedBus


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
