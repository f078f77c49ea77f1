"""The controller's loop in process, on the embedded log: steps, reconnection, manual runs, announcements."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from monitoring.controller import Controller, exclusive_controller
from monitoring.metrics import ControllerMetrics
from tests.support.processes import ROOT, free_port, running_controller, wait_for
from tuneloop.bus import BusUnavailable, EmbeddedBus, Message
from tuneloop.config import Settings
from tuneloop.database import LOCK_CHECK_S
from tuneloop.errors import Conflict
from tuneloop.events import FeedbackEvent, ModelEvent, PredictionEvent
from tuneloop.runs import ACTIVE


def settings_in(tmp_path: Path) -> Settings:
    settings = Settings()
    settings.registry.url = str(tmp_path / "registry")  # empty: no version has a drift reference
    settings.events.embedded_path = tmp_path / "events.db"
    settings.events.kafka_bootstrap_servers = ""
    settings.controller.store_url = str(tmp_path / "store.db")
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
        wait_for(lambda: controller.state.runs()[0]["status"] not in ACTIVE, 20, "the run to end", interval=0.05)
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


def test_a_second_controller_on_the_same_store_refuses_to_start(store_url: str) -> None:
    # Two controllers on one store both stored everything, both judged rollouts and both started runs.
    with exclusive_controller(store_url), pytest.raises(Conflict, match="another controller holds .*; stop it first"), \
            exclusive_controller(store_url):
        pass
    with exclusive_controller(store_url):  # released when the first one stopped
        pass


HOLD_THE_LOCK = """
import sys, time
from monitoring.controller import exclusive_controller
with exclusive_controller(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def lock_holder(store_url: str) -> subprocess.Popen[str]:
    """Another process holding the controller lock on `store_url`; it prints `held` once it does."""
    return subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, store_url], stdout=subprocess.PIPE, text=True, cwd=ROOT)


def test_the_controller_lock_goes_with_a_killed_process(store_url: str) -> None:
    holder = lock_holder(store_url)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Conflict), exclusive_controller(store_url):
            pass
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: _takes_lock(store_url), 10, "the lock to be free after SIGKILL")


def _takes_lock(store_url: str) -> bool:
    try:
        with exclusive_controller(store_url):
            return True
    except Conflict:
        return False


def _cut_lock_sessions(url: str) -> None:
    """End the lock's PostgreSQL session from the server's side, as a restart or a dropped link would."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                      "'tuneloop controller lock' AND datname = current_database()")


def test_a_controller_whose_lock_session_breaks_takes_the_lock_back(postgres: object) -> None:
    url = postgres.create_database(f"lock_{uuid.uuid4().hex[:12]}")
    with exclusive_controller(url):
        _cut_lock_sessions(url)
        time.sleep(2 * LOCK_CHECK_S + 1)
        with pytest.raises(Conflict), exclusive_controller(url):  # held again by the first
            pass


def test_the_lock_is_not_known_held_while_its_server_is_away(postgres: object) -> None:
    # While it is not, the controller joins no Kafka group: as the one static member it would fence the consumer
    # of a controller that took the lock meanwhile.
    url = postgres.create_database(f"lock_{uuid.uuid4().hex[:12]}")
    with exclusive_controller(url) as held:
        assert held.is_set()
        postgres.stop()
        try:
            wait_for(lambda: not held.is_set(), 3 * LOCK_CHECK_S + 15, "the lock no longer known held")
        finally:
            postgres.start()
        wait_for(held.is_set, 3 * LOCK_CHECK_S + 10, "the lock held again")


def test_a_controller_that_lost_its_lock_to_another_stops(postgres: object) -> None:
    url = postgres.create_database(f"lock_{uuid.uuid4().hex[:12]}")
    holder = lock_holder(url)
    try:
        assert holder.stdout.readline().strip() == "held"
        _cut_lock_sessions(url)
        with exclusive_controller(url):  # taken before the first one noticed
            assert holder.wait(timeout=3 * LOCK_CHECK_S + 5) == -signal.SIGTERM
    finally:
        holder.kill()
        holder.wait()


def test_a_controller_waiting_to_lead_takes_the_lock_when_the_leader_stops(store_url: str) -> None:
    leader = lock_holder(store_url)
    acquired, stop = threading.Event(), threading.Event()

    def wait_to_lead() -> None:
        with exclusive_controller(store_url, wait=stop):
            acquired.set()

    try:
        assert leader.stdout.readline().strip() == "held"
        waiting = threading.Thread(target=wait_to_lead)
        waiting.start()
        assert not acquired.wait(2 * LOCK_CHECK_S + 1)  # the leader holds it: the other waits
        leader.kill()
        assert acquired.wait(2 * LOCK_CHECK_S + 5)
        waiting.join()
    finally:
        leader.kill()
        leader.wait()
    with exclusive_controller(store_url), pytest.raises(Conflict):  # a stop while waiting ends the wait
        stop.set()
        with exclusive_controller(store_url, wait=stop):
            pass


def test_a_controller_stops_cleanly_on_sigterm_leading_or_waiting(tmp_path: Path) -> None:
    # In a container the controller is PID 1, where a signal with the default action is dropped: SIGTERM (a pod's
    # deletion, or a leader that lost its lock stopping itself) did nothing until the SIGKILL 30 s later.
    env = {"TUNELOOP_EVENTS__EMBEDDED_PATH": str(tmp_path / "events.db"),
           "TUNELOOP_CONTROLLER__STORE_URL": str(tmp_path / "store.db"),
           "TUNELOOP_CONTROLLER__WAIT_TO_LEAD": "true", "TUNELOOP_TRIGGER__MIN_NEW_ROWS": str(10**9)}
    registry = tmp_path / "registry"
    with running_controller(registry, tmp_path, env | {"TUNELOOP_CONTROLLER__PORT": str(free_port())}) as leader, \
            running_controller(registry, tmp_path, env | {"TUNELOOP_CONTROLLER__PORT": str(free_port())}) as waiting:
        for process in (waiting, leader):
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0, process.log.read_text()
