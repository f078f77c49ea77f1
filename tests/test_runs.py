"""Training runs as processes (monitoring/runs.py): exit codes, adoption by a restarted controller, reused pids."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitoring import runs
from monitoring.runs import RunLauncher
from monitoring.state import ControllerState
from monitoring.trigger import Decision
from tests.support.processes import wait_for
from tuneloop.config import TriggerConfig


def launcher(tmp_path: Path, code: str) -> tuple[RunLauncher, ControllerState]:
    state = ControllerState(tmp_path / "state.db")
    config = TriggerConfig(command=[sys.executable, "-c", code, "{run_id}"], runs_dir=tmp_path / "runs",
                           standby_command=None)
    return RunLauncher(config, state), state


def wait_finished(runner: RunLauncher) -> list:
    finished: list = []
    wait_for(lambda: bool(finished.extend(runner.poll()) or finished), 30, "the run to finish", interval=0.1)
    return finished


def test_a_run_is_a_process_whose_exit_code_decides_its_status(tmp_path: Path) -> None:
    runner, state = launcher(tmp_path, "import sys; print('run', sys.argv[1]); sys.exit(4)")
    run_id = state.start_run(Decision("fired", "manual", "test", "manual"), new_rows=5, now=time.time())
    runner.start(run_id)
    assert runner.in_progress
    [finished] = wait_finished(runner)
    assert (finished.run_id, finished.status, finished.exit_code) == (run_id, "failed", 4)
    [row] = state.runs()
    assert row["status"] == "failed" and row["exit_code"] == 4 and row["new_rows"] == 5
    assert Path(row["log_path"]).read_text().strip() == f"run {run_id}"  # {run_id} was filled in


def test_a_restarted_controller_adopts_a_live_run_and_marks_a_vanished_one_lost(tmp_path: Path) -> None:
    runner, state = launcher(tmp_path, "import time; time.sleep(2)")
    decision = Decision("fired", "drift_sustained", "test")
    live = state.start_run(decision, 0, time.time())
    runner.start(live)
    gone = state.start_run(decision, 0, time.time())
    state.run_started(gone, 2**22 + 12345, tmp_path / "none.log")  # a pid no process has
    adopted = RunLauncher(runner.config, state)  # as a new controller would, with the first still running
    assert adopted.in_progress
    assert {r["id"]: r["status"] for r in state.runs()} == {live: "running", gone: "lost"}
    # Here the test process is the run's parent, so it reaps the exit; the adopter sees the pid gone.
    assert [(f.run_id, f.status) for f in wait_finished(runner)] == [(live, "succeeded")]
    assert [(f.run_id, f.status, f.exit_code) for f in adopted.poll()] == [(live, "lost", None)]
    assert not adopted.in_progress


def test_a_reused_pid_is_not_adopted_as_the_run(tmp_path: Path) -> None:
    # After a restart the recorded pid often belongs to another process by then: adopting it held off training
    # for as long as that process lived.
    runner, state = launcher(tmp_path, "pass")
    run_id = state.start_run(Decision("fired", "drift_sustained", "test"), 0, time.time() - 600)  # the run began 10 min ago
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # started now, same pid recorded
    try:
        state.run_started(run_id, stranger.pid, tmp_path / "run.log")
        restarted = RunLauncher(runner.config, state)
        assert not restarted.in_progress
        assert [r["status"] for r in state.runs()] == ["lost"]
    finally:
        stranger.kill()
        stranger.wait()


# A stand-in for `tuneloop train --standby`: ready at once, then runs whatever run id its stdin names.
STANDBY = """
import os, sys, time
print("standby", os.getpid(), flush=True)
line = sys.stdin.readline()
if not line:
    sys.exit(0)
run_id, started = line.split()
print("run", run_id, "handed after", round(time.time() - float(started), 1), flush=True)
time.sleep(float(os.environ.get("RUN_S", "0")))
sys.exit(3)
"""


def standby_launcher(tmp_path: Path) -> tuple[RunLauncher, ControllerState]:
    state = ControllerState(tmp_path / "state.db")
    config = TriggerConfig(command=[sys.executable, "-c", "import sys; sys.exit(9)", "{run_id}"],
                           standby_command=[sys.executable, "-c", STANDBY], runs_dir=tmp_path / "runs")
    return RunLauncher(config, state), state


def test_a_run_is_handed_to_the_warmed_standby_and_none_starts_unless_warmed_again(tmp_path: Path) -> None:
    runner, state = standby_launcher(tmp_path)
    assert runner.poll() == [] and runner._standby is None  # nothing warmed it: no standby
    runner.warm()
    standby_log = tmp_path / "runs" / "standby.log"
    wait_for(lambda: standby_log.is_file() and "standby" in standby_log.read_text(), 30, "the standby ready")
    first_pid = int(standby_log.read_text().split()[1])
    runner.warm()  # warming again keeps the same one
    assert runner._standby is not None and runner._standby.pid == first_pid
    run_id = state.start_run(Decision("fired", "manual", "test", "manual"), new_rows=5, now=time.time())
    runner.start(run_id)
    [finished] = wait_finished(runner)
    # The standby's exit code, not `command`'s 9.
    assert (finished.run_id, finished.status, finished.exit_code) == (run_id, "rejected", 3)
    [row] = state.runs()
    assert row["pid"] == first_pid
    log_text = Path(row["log_path"]).read_text()
    assert Path(row["log_path"]).name == f"run-{run_id}.log" and f"standby {first_pid}" in log_text
    assert f"run {run_id} handed after" in log_text
    assert not standby_log.exists() and runner._standby is None  # the next one waits for drift to warm it


def test_no_standby_beside_a_run_and_a_dead_one_means_a_cold_start(tmp_path: Path) -> None:
    runner, state = standby_launcher(tmp_path)
    runner.config.command = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(4)", "{run_id}"]
    runner.warm()
    standby = runner._standby
    assert standby is not None
    standby.kill()  # a standby gone (killed, or out of memory) before the trigger
    standby.wait()
    run_id = state.start_run(Decision("fired", "manual", "test", "manual"), new_rows=5, now=time.time())
    runner.start(run_id)  # started cold from `command`
    runner.warm()
    assert runner._standby is None  # in progress: no standby beside it
    [finished] = wait_finished(runner)
    assert (finished.run_id, finished.exit_code) == (run_id, 4)
    runner.warm()
    assert runner._standby is not None
    runner.close()
    assert runner._standby is None and standby.poll() is not None


def test_a_standby_nobody_uses_ends_and_one_that_dies_is_not_restarted_at_once(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runner, _ = standby_launcher(tmp_path)
    monkeypatch.setattr(runs, "STANDBY_IDLE_S", 0.2)
    runner.warm()
    standby = runner._standby
    assert standby is not None
    time.sleep(0.3)
    runner.poll()
    assert runner._standby is None and standby.wait(10) is not None  # ended: it held memory for nothing
    runner.warm()
    crashing = runner._standby
    assert crashing is not None
    crashing.kill()
    crashing.wait()
    runner.poll()  # noticed: exited on its own
    runner.warm()
    assert runner._standby is None  # not at once: a standby that keeps crashing must not loop


def test_a_restarted_controller_adopts_a_run_its_standby_began_before_the_run(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUN_S", "5")
    runner, state = standby_launcher(tmp_path)
    runner.warm()
    standby_log = tmp_path / "runs" / "standby.log"
    wait_for(lambda: standby_log.is_file() and "standby" in standby_log.read_text(), 30, "the standby ready")
    # The standby process started well before the run's row (drift warms it windows ahead).
    run_id = state.start_run(Decision("fired", "manual", "test", "manual"), new_rows=5, now=time.time() + 60)
    runner.start(run_id)
    restarted = RunLauncher(runner.config, state)
    assert restarted.in_progress and [r["status"] for r in state.runs()] == ["running"]
    wait_finished(runner)
    runner.close()
