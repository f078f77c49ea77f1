"""The controller's loop in process, on the embedded log: steps, reconnection, manual runs, announcements."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitoring.controller import Controller, exclusive_controller
from monitoring.metrics import ControllerMetrics
from tests.support.processes import wait_for
from tuneloop.bus import BusUnavailable, EmbeddedBus, Message
from tuneloop.config import Settings
from tuneloop.errors import Conflict
from tuneloop.events import FeedbackEvent, ModelEvent, PredictionEvent


def settings_in(tmp_path: Path) -> Settings:
    settings = Settings()
    settings.registry.path = tmp_path / "registry"  # empty: no version has a drift reference
    settings.events.embedded_path = tmp_path / "events.db"
    settings.events.kafka_bootstrap_servers = ""
    settings.controller.store_path = tmp_path / "store.db"
    settings.trigger.command = [sys.executable, "-c", "pass"]  # a stand-in for `tuneloop train`
    settings.trigger.runs_dir = tmp_path / "runs"
    return settings


def controller_in(tmp_path: Path, bus: EmbeddedBus | None = None) -> Controller:
    return Controller(settings_in(tmp_path), bus=bus, metrics=ControllerMetrics(CollectorRegistry()))



@contextmanager
def running(controller: Controller) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive()


def publish_feedback(controller: Controller, *events: FeedbackEvent) -> None:
    messages = [(e.feedback_id.encode(), e.model_dump_json().encode()) for e in events]
    assert all(controller.bus.publish_many(controller.topics.feedback, messages))


def test_a_step_stores_the_batch_and_returns_its_size(tmp_path: Path) -> None:
    controller = controller_in(tmp_path)
    topics = controller.topics
    event = PredictionEvent(request_id="r1", text="t", label="a", scores={"a": 0.9, "b": 0.1}, model_version=1)
    controller.bus.publish_many(topics.predictions, [(b"r1", event.model_dump_json().encode())])
    publish_feedback(controller, FeedbackEvent(request_id="r1", label="b"))
    consumer = controller.bus.consumer(controller.settings.controller.group_id, [topics.predictions, topics.feedback])
    assert controller.step(consumer) == 2
    assert controller.step(consumer) == 0
    assert [(row["label"], row["predicted_label"]) for row in controller.store.feedback_rows()] == [("b", "a")]


class FlakyDeadLetters(EmbeddedBus):
    """The dead-letter topic refuses the first message, as a broker going away would."""

    refused = 0

    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        if topic.endswith("dead-letter") and not self.refused:
            self.refused += 1
            return [False] * len(messages)
        return super().publish_many(topic, messages, timeout_s)


def test_the_loop_resumes_from_the_committed_offsets_after_a_failed_step(tmp_path: Path) -> None:
    bus = FlakyDeadLetters(tmp_path / "events.db")
    controller = controller_in(tmp_path, bus)
    publish_feedback(controller, FeedbackEvent(feedback_id="f1", text="fine", label="a"))
    bus.publish_many(controller.topics.feedback, [(None, b"not json")])
    letters = bus.consumer("reader", [controller.topics.dead_letter])
    with running(controller):
        received: list[dict] = []
        wait_for(lambda: bool(received.extend(json.loads(r.value) for r in letters.poll(10, 0.1)) or received), 20,
                 "a dead letter", interval=0.05)
    assert bus.refused == 1
    assert [letter["raw"] for letter in received] == ["not json"]
    assert controller.store.count() == 1  # the batch came twice, was stored once
    assert controller.metrics.registry.get_sample_value("tuneloop_controller_duplicates_skipped_total") == 1


def test_a_manual_request_is_decided_on_the_loop_and_starts_a_run(tmp_path: Path) -> None:
    controller = controller_in(tmp_path)
    with running(controller):
        decision, run_id = controller.admin.request_manual("test", timeout_s=20)
        assert decision.fired and decision.source == "manual" and run_id == 1
        wait_for(lambda: controller.state.runs()[0]["status"] != "running", 20, "the run to end", interval=0.05)
    [run] = controller.state.runs()
    assert (run["source"], run["reason"], run["status"]) == ("manual", "manual request: test", "succeeded")
    status = controller.admin.status()
    assert [d["outcome"] for d in status.recent_decisions] == ["fired"]
    assert status.live_version is None and status.rollout is None


def test_a_manual_request_times_out_when_no_loop_answers(tmp_path: Path) -> None:
    controller = controller_in(tmp_path)
    with pytest.raises(TimeoutError, match="did not answer within 0.1 s"):
        controller.admin.request_manual("nobody listens", timeout_s=0.1)


class DownBus(EmbeddedBus):
    def publish_many(self, topic: str, messages: list[Message], timeout_s: float = 5.0) -> list[bool]:
        raise BusUnavailable("down")


def test_an_announcement_the_bus_refuses_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    controller = controller_in(tmp_path, DownBus(tmp_path / "events.db"))
    controller.announce(ModelEvent(action="promote", version=2))
    assert "model event not published (down)" in caplog.text


def test_a_second_controller_on_the_same_store_refuses_to_start(tmp_path: Path) -> None:
    # Two controllers on one embedded log both stored everything, both judged rollouts and both started runs.
    store = tmp_path / "store.db"
    with exclusive_controller(store):
        with pytest.raises(Conflict, match="another controller is running on .*store.db"), exclusive_controller(store):
            pass
    with exclusive_controller(store):  # released when the first one stopped
        pass
