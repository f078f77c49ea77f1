"""The controller's ingest in process, on the embedded log: store, dead letters, commit, redelivery."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitoring.ingest import DeadLetters, Ingest, parse
from monitoring.metrics import ControllerMetrics
from tuneloop.bus import MAX_MESSAGE_BYTES, EmbeddedBus, EmbeddedConsumer, Message, Record
from tuneloop.config import ControllerConfig, TopicsConfig
from tuneloop.events import DeadLetter, FeedbackEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore

TOPICS = TopicsConfig()
GROUP = "test-controller"


def prediction(request_id: str, label: str = "positive", version: int = 1, shadow: bool = False) -> bytes:
    event = PredictionEvent(
        request_id=request_id, text=f"text of {request_id}", label=label,
        scores={"negative": 0.2, "positive": 0.8}, model_version=version, shadow=shadow,
    )
    return event.model_dump_json().encode()


def feedback(feedback_id: str, label: str = "negative", request_id: str | None = None, text: str | None = None) -> bytes:
    return FeedbackEvent(feedback_id=feedback_id, request_id=request_id, text=text, label=label).model_dump_json().encode()


class Harness:
    def __init__(self, tmp_path: Path, store_url: str, join_timeout_s: float = 300.0, bus: EmbeddedBus | None = None) -> None:
        self.bus = bus or EmbeddedBus(tmp_path / "events.db")
        self.store = FeedbackStore(store_url)
        self.prometheus = CollectorRegistry()
        self.metrics = ControllerMetrics(self.prometheus)
        config = ControllerConfig(store_url=store_url, group_id=GROUP, join_timeout_s=join_timeout_s)
        self.ingest = Ingest(config, TOPICS, self.bus, self.store, self.metrics.ingest)
        self.path = tmp_path / "events.db"

    def publish(self, topic: str, *values: bytes) -> None:
        assert all(self.bus.publish_many(topic, [(None, value) for value in values]))

    def consumer(self) -> EmbeddedConsumer:
        return self.bus.consumer(GROUP, [TOPICS.predictions, TOPICS.feedback])

    def dead_letters(self) -> list[dict]:
        reader = EmbeddedBus(self.path).consumer("test-reader", [TOPICS.dead_letter])
        return [json.loads(r.value) for r in reader.poll(100, timeout_s=0.1)]

    def sample(self, name: str, **labels: str) -> float:
        return self.prometheus.get_sample_value(name, labels) or 0.0


def test_parse_routes_by_topic_and_names_the_first_error() -> None:
    records = [
        Record(TOPICS.predictions, 0, 0, None, prediction("r1")),
        Record(TOPICS.feedback, 0, 1, None, feedback("f1", request_id="r1")),
        Record(TOPICS.feedback, 0, 2, None, b"{not json"),
        Record(TOPICS.feedback, 0, 3, None, json.dumps({"label": "x"}).encode()),
        Record(TOPICS.predictions, 0, 4, None, json.dumps({"request_id": "r2"}).encode()),
    ]
    parsed = parse(records, TOPICS.predictions)
    assert [p.request_id for p in parsed.predictions] == ["r1"]
    assert [f.feedback_id for f in parsed.feedback] == ["f1"]
    assert [bad.record.offset for bad in parsed.malformed] == [2, 3, 4]
    reasons = [bad.reason for bad in parsed.malformed]
    assert reasons[0].startswith(f"malformed {TOPICS.feedback} message: Invalid JSON")
    assert reasons[1].endswith("at top level")  # the model validator, not a field, refused it
    assert reasons[1].startswith(f"malformed {TOPICS.feedback} message: Value error, feedback needs a request_id")
    assert reasons[2] == f"malformed {TOPICS.predictions} message: Field required at ['text']"


def test_a_batch_is_stored_joined_and_committed(tmp_path: Path, store_url: str) -> None:
    h = Harness(tmp_path, store_url)
    h.publish(TOPICS.predictions, prediction("r1", label="positive"), prediction("r1", version=2, shadow=True))
    h.publish(TOPICS.feedback, feedback("f1", request_id="r1"), feedback("f2", text="a dull film"))
    consumer = h.consumer()
    ingested = h.ingest.step(consumer)
    assert ingested.records == 4
    assert [(p.request_id, p.shadow) for p in ingested.predictions] == [("r1", False), ("r1", True)]
    rows = {row["feedback_id"]: row for row in h.store.feedback_rows()}
    assert rows["f1"]["predicted_label"] == "positive" and rows["f1"]["text"] == "text of r1"
    assert rows["f2"]["predicted_label"] is None and rows["f2"]["text"] == "a dull film"
    assert h.sample("tuneloop_controller_consumed_total", topic=TOPICS.predictions) == 2
    assert h.sample("tuneloop_controller_consumed_total", topic=TOPICS.feedback) == 2
    assert h.sample("tuneloop_controller_feedback_stored_total") == 2
    assert h.sample("tuneloop_controller_consumer_lag", topic=TOPICS.feedback, partition="0") == 0
    assert h.dead_letters() == []
    # Committed: the same group, reconnected, starts after the batch.
    assert h.consumer().poll(100, timeout_s=0.1) == []
    assert h.ingest.step(consumer).records == 0


def test_resent_feedback_is_counted_as_a_duplicate_and_stored_once(tmp_path: Path, store_url: str) -> None:
    h = Harness(tmp_path, store_url)
    h.publish(TOPICS.feedback, feedback("f1", text="a fine film"), feedback("f1", text="a fine film"))
    consumer = h.consumer()
    h.ingest.step(consumer)
    h.publish(TOPICS.feedback, feedback("f1", text="a fine film"))
    h.ingest.step(consumer)
    assert h.store.count() == 1
    assert h.sample("tuneloop_controller_feedback_stored_total") == 1
    assert h.sample("tuneloop_controller_duplicates_skipped_total") == 2


def test_malformed_messages_are_dead_lettered_with_their_reason_and_committed(tmp_path: Path, store_url: str) -> None:
    h = Harness(tmp_path, store_url)
    h.publish(TOPICS.feedback, b"\xffnot json", feedback("f1", text="fine"))
    h.publish(TOPICS.predictions, b"{}")
    h.ingest.step(h.consumer())
    letters = h.dead_letters()
    assert [(letter["topic"], letter["raw"]) for letter in letters] == [
        (TOPICS.feedback, "\ufffdnot json"), (TOPICS.predictions, "{}")
    ]
    assert all(letter["reason"].startswith(f"malformed {letter['topic']} message: ") for letter in letters)
    assert h.sample("tuneloop_controller_dead_lettered_total", reason="malformed") == 2
    assert h.store.count() == 1  # the good message of the batch is stored
    assert h.consumer().poll(100, timeout_s=0.1) == []


def test_feedback_waits_for_its_prediction_and_is_joined_when_it_arrives(tmp_path: Path, store_url: str) -> None:
    h = Harness(tmp_path, store_url)
    consumer = h.consumer()
    h.publish(TOPICS.feedback, feedback("f1", request_id="late"))
    h.ingest.step(consumer)
    assert (h.store.count(), h.store.count("pending_feedback")) == (0, 1)
    assert h.sample("tuneloop_controller_pending_feedback") == 1
    h.publish(TOPICS.predictions, prediction("late", label="negative"))
    h.ingest.step(consumer)
    assert (h.store.count(), h.store.count("pending_feedback")) == (1, 0)
    assert h.store.feedback_rows()[0]["predicted_label"] == "negative"
    assert h.sample("tuneloop_controller_pending_feedback") == 0
    assert h.dead_letters() == []


def test_unjoined_feedback_is_dead_lettered_after_the_join_timeout(tmp_path: Path, store_url: str) -> None:
    h = Harness(tmp_path, store_url, join_timeout_s=1e-6)
    payload = feedback("f1", request_id="never")
    h.publish(TOPICS.feedback, payload)
    h.ingest.step(h.consumer())
    [letter] = h.dead_letters()
    assert letter["topic"] == TOPICS.feedback
    assert letter["reason"] == "its prediction did not arrive within 1e-06 s"
    assert FeedbackEvent.model_validate_json(letter["raw"]).feedback_id == "f1"
    assert h.store.count("pending_feedback") == 0 and h.store.count() == 0
    assert h.sample("tuneloop_controller_dead_lettered_total", reason="unjoined") == 1


class RefusingDeadLetters(EmbeddedBus):
    """The dead-letter topic does not acknowledge; every other topic does."""

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        if topic == TOPICS.dead_letter:
            return [False] * len(messages)
        return super().publish_many(topic, messages, timeout_s)


def test_a_refused_dead_letter_commits_nothing_and_the_redelivery_stores_nothing_twice(tmp_path: Path, store_url: str) -> None:
    h = Harness(tmp_path, store_url, bus=RefusingDeadLetters(tmp_path / "events.db"))
    h.publish(TOPICS.feedback, feedback("f1", text="fine"), b"garbage")
    with pytest.raises(RuntimeError, match="did not acknowledge"):
        h.ingest.step(h.consumer())
    assert h.store.count() == 1  # written before the dead letter was refused...
    assert h.sample("tuneloop_controller_dead_lettered_total", reason="malformed") == 0
    # ...but not committed: a new consumer of the group (the controller reconnecting) gets the batch again.
    retry = Harness(tmp_path, store_url)  # the dead-letter topic acknowledges now
    ingested = retry.ingest.step(retry.consumer())
    assert ingested.records == 2
    assert retry.store.count() == 1
    assert retry.sample("tuneloop_controller_duplicates_skipped_total") == 1
    assert [letter["raw"] for letter in retry.dead_letters()] == ["garbage"]


def test_dead_letters_raise_when_not_acknowledged(tmp_path: Path) -> None:
    metrics = ControllerMetrics(CollectorRegistry()).ingest
    with pytest.raises(RuntimeError, match=f"dead-letter topic {TOPICS.dead_letter} did not acknowledge"):
        DeadLetters(RefusingDeadLetters(tmp_path / "events.db"), TOPICS.dead_letter, metrics).send(
            [DeadLetter.of(TOPICS.feedback, b"raw", "reason")], "malformed"
        )


# 400k backslashes escape to 800k characters on the bus, and to 1.6 MB in a dead letter quoting them whole: Kafka
# refused that letter, the batch was never committed, and every reconnect polled it again (storing stopped).
BACKSLASHES = "\\" * 400_000


def assert_bounded(letter: dict, payload: bytes) -> None:
    assert len(json.dumps(letter).encode()) <= MAX_MESSAGE_BYTES
    assert letter["raw_bytes"] == len(payload) and letter["raw_sha256"] == hashlib.sha256(payload).hexdigest()
    assert payload.decode().startswith(letter["raw"]) and len(letter["raw"]) < len(payload)


def test_an_oversized_malformed_message_is_dead_lettered_bounded_and_the_batch_commits(tmp_path: Path, store_url: str) -> None:
    h = Harness(tmp_path, store_url)
    payload = json.dumps({"text": BACKSLASHES, "label": "negative", "colour": "red"}).encode()
    h.publish(TOPICS.feedback, payload, feedback("f2", text="fine"))
    h.ingest.step(h.consumer())
    [letter] = h.dead_letters()
    assert_bounded(letter, payload)
    assert h.store.count() == 1 and h.consumer().poll(100, timeout_s=0.1) == []


class Counting(EmbeddedBus):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[tuple[str, int]] = []

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        self.calls.append((topic, len(messages)))
        return super().publish_many(topic, messages, timeout_s)


def test_expired_feedback_is_dead_lettered_in_one_publish_each_bounded(tmp_path: Path, store_url: str) -> None:
    bus = Counting(tmp_path / "events.db")
    h = Harness(tmp_path, store_url, join_timeout_s=1e-6, bus=bus)
    payloads = [feedback(f"f{i}", request_id="nope", text=BACKSLASHES if i == 0 else None) for i in range(50)]
    h.publish(TOPICS.feedback, *payloads)
    h.ingest.step(h.consumer())
    letters = h.dead_letters()
    assert len(letters) == 50 and [c for c in bus.calls if c[0] == TOPICS.dead_letter] == [(TOPICS.dead_letter, 50)]
    assert_bounded(letters[0], payloads[0])
    assert all(letter["raw"] == payload.decode() and letter["raw_bytes"] == len(payload)
               for letter, payload in zip(letters[1:], payloads[1:], strict=True))


def test_feedback_naming_a_prediction_stores_the_text_that_was_served_not_a_text_sent_with_it(tmp_path: Path, store_url: str) -> None:
    # The client's text replaced the joined one: a label for one text could be trained on with another.
    h = Harness(tmp_path, store_url)
    h.publish(TOPICS.predictions, prediction("r1", label="positive"))
    h.publish(TOPICS.feedback, feedback("f1", label="negative", request_id="r1", text="some other text"))
    h.ingest.step(h.consumer())
    [row] = h.store.feedback_rows()
    assert (row["text"], row["label"], row["predicted_label"]) == ("text of r1", "negative", "positive")
