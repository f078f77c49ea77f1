"""Drift to runs in process: closed windows exported and recorded, decisions acted on, runs started and collected."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitoring.drift import Signal
from monitoring.drift_watch import DriftWatch
from monitoring.metrics import ControllerMetrics
from monitoring.state import ControllerState
from monitoring.windows import WindowReport
from tests.support.processes import wait_for
from tuneloop.config import Settings
from tuneloop.events import PredictionEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry
from tuneloop.runs import ACTIVE, RunQueue
from tuneloop.worker import Worker


class Setup:
    def __init__(self, tmp_path: Path, store_url: str, command: list[str] | None = None, standby: list[str] | None = None,
                 local_worker: bool = True) -> None:
        settings = Settings()
        settings.trigger.local_worker = local_worker
        settings.trigger.consecutive_windows, settings.trigger.min_new_rows = 1, 0
        settings.trigger.feedback_quiet_s = 0
        settings.trigger.command = command or [sys.executable, "-c", "pass"]
        settings.trigger.runs_dir = tmp_path / "runs"
        settings.trigger.standby_command = standby
        self.state = ControllerState(store_url)
        self.prometheus = CollectorRegistry()
        self.watch = DriftWatch(settings, Registry(tmp_path / "registry"), FeedbackStore(store_url),
                                self.state, ControllerMetrics(self.prometheus).drift)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.prometheus.get_sample_value(name, labels)


def report(drifted: bool, version: int = 1) -> WindowReport:
    signals = [
        Signal("embedding_mmd", 0.3, 0.05, p_value=0.001 if drifted else 0.5),
        Signal("feedback_accuracy", 0.9, 0.8, lower_is_drift=True),
    ]
    return WindowReport(version, 200, signals, recall={"pos": 0.75}, feedback_rows=40)


def test_a_window_is_exported_and_recorded_and_a_quiet_one_decides_nothing(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    s.watch._on_window(report(drifted=False))
    assert s.sample("tuneloop_drift_value", signal="embedding_mmd", model_version="1") == 0.3
    assert s.sample("tuneloop_drift_p_value", signal="embedding_mmd", model_version="1") == 0.5
    assert s.sample("tuneloop_drift_p_value", signal="feedback_accuracy", model_version="1") is None
    assert s.sample("tuneloop_drift_detected", signal="embedding_mmd", model_version="1") == 0
    assert s.sample("tuneloop_feedback_recall", label="pos", model_version="1") == 0.75
    assert s.sample("tuneloop_feedback_window_rows", model_version="1") == 40
    assert s.sample("tuneloop_drift_windows_total", model_version="1", drifted="false") == 1
    assert s.sample("tuneloop_trigger_decisions_total", source="drift", outcome="none", reason="no_drift") == 1
    assert len(s.state.windows()) == 1 and s.state.decisions() == []  # "none" decisions are counted, not recorded


def test_sustained_drift_starts_a_run_that_is_collected_when_it_ends(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    s.watch._on_window(report(drifted=True))
    assert s.sample("tuneloop_trigger_decisions_total", source="drift", outcome="fired", reason="drift_sustained") == 1
    assert s.sample("tuneloop_training_runs_total", outcome="started") == 1
    assert s.sample("tuneloop_training_last_run_start_time_seconds") == pytest.approx(time.time(), abs=60)

    def collected() -> bool:
        s.watch.collect_finished_runs()
        return s.state.runs()[0]["status"] not in ACTIVE

    wait_for(collected, 20, "the run to be collected", interval=0.05)
    assert s.state.runs()[0]["status"] == "succeeded"
    assert s.sample("tuneloop_training_runs_total", outcome="succeeded") == 1


def test_a_run_that_cannot_start_is_counted_as_failed(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url, command=[str(tmp_path / "no-such-program")])
    s.watch._on_window(report(drifted=True))
    s.watch.collect_finished_runs()
    assert s.sample("tuneloop_training_runs_total", outcome="failed") == 1
    [run] = s.state.runs()
    assert run["status"] == "failed" and "no-such-program" in run["detail"]


def test_without_a_local_worker_a_request_waits_for_one_and_a_silent_run_is_failed(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url, local_worker=False)
    s.watch.trigger_config.cooldown_s = 0
    s.watch._on_window(report(drifted=True))
    s.watch.collect_finished_runs()
    assert [r["status"] for r in s.state.runs()] == ["requested"]  # no worker here: it waits for `tuneloop trainer`
    assert s.sample("tuneloop_training_runs_in_progress") == 1
    s.watch._on_window(report(drifted=True))
    assert len(s.state.runs()) == 1  # one in progress: no second
    remote = Worker(s.watch.trigger_config, RunQueue(store_url), "gpu-host:1")
    run_id = remote.step()
    assert run_id == 1 and s.state.runs()[0]["worker"] == "gpu-host:1"
    wait_for(lambda: (remote.step(), s.state.runs()[0]["status"])[1] == "succeeded", 20, "the remote run to end")
    s.watch.collect_finished_runs()
    assert s.sample("tuneloop_training_runs_total", outcome="succeeded") == 1
    assert s.sample("tuneloop_training_runs_in_progress") == 0
    s.watch.trigger_config.heartbeat_timeout_s = 0.2
    s.watch._on_window(report(drifted=True))
    RunQueue(store_url).claim("vanishing-host:1")  # claimed, then never a heartbeat
    time.sleep(0.3)
    s.watch.collect_finished_runs()
    assert s.state.runs()[1]["status"] == "failed" and "no heartbeat" in s.state.runs()[1]["detail"]
    assert s.sample("tuneloop_training_runs_total", outcome="failed") == 1


def test_a_manual_request_is_answered_on_the_next_observe(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    answers: list[tuple[object, int | None]] = []
    asking = threading.Thread(target=lambda: answers.append(s.watch.request_manual("by hand", timeout_s=20)))
    asking.start()
    while s.watch._manual.empty():
        time.sleep(0.01)
    s.watch.observe([])
    asking.join(10)
    [(decision, run_id)] = answers
    assert decision.fired and decision.source == "manual" and run_id == 1


def test_traffic_of_a_version_without_reference_is_not_monitored(tmp_path: Path, store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    s = Setup(tmp_path, store_url)
    events = [PredictionEvent(request_id=f"r{i}", text="t", label="a", scores={"a": 1.0}, model_version=9)
              for i in range(300)]
    s.watch.observe(events)
    assert s.state.windows() == []
    assert "cannot read the drift reference of v9" in caplog.text


def test_a_drifted_window_short_of_k_warms_a_standby_that_the_run_then_uses(tmp_path: Path, store_url: str) -> None:
    standby = [sys.executable, "-c", "import sys; sys.stdin.readline(); print('ran', flush=True)"]
    s = Setup(tmp_path, store_url, command=[sys.executable, "-c", "print('cold')"], standby=standby)
    s.watch.trigger_config.consecutive_windows = 2
    s.watch._on_window(report(drifted=False))
    assert s.watch.worker._standby is None  # no drift, no standby
    s.watch._on_window(report(drifted=True))  # 1 of 2 windows: a run may follow
    warmed = s.watch.worker._standby
    assert warmed is not None
    s.watch._on_window(report(drifted=True))  # fired: handed to the standby
    [run] = s.state.runs()
    assert run["pid"] == warmed.process.pid

    def collected() -> bool:
        s.watch.collect_finished_runs()
        return s.state.runs()[0]["status"] not in ACTIVE

    wait_for(collected, 20, "the run to be collected", interval=0.05)
    assert Path(s.state.runs()[0]["log_path"]).read_text() == "ran\n"
