"""Training runs as processes (monitoring/runs.py): exit codes, adoption by a restarted controller, reused pids."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitoring import runs
from monitoring.runs import RunLauncher, Standby
from monitoring.state import ControllerState
from monitoring.trigger import Decision
from tests.support.processes import wait_for
from tuneloop.config import TriggerConfig


def launcher(tmp_path: Path, store_url: str, code: str) -> tuple[RunLauncher, ControllerState]:
    state = ControllerState(store_url)
    config = TriggerConfig(command=[sys.executable, "-c", code, "{run_id}"], runs_dir=tmp_path / "runs",
                           standby_command=None)
    return RunLauncher(config, state), state


def wait_finished(runner: RunLauncher) -> list:
    finished: list = []
    wait_for(lambda: bool(finished.extend(runner.poll()) or finished), 30, "the run to finish", interval=0.1)
    return finished


def test_a_run_is_a_process_whose_exit_code_decides_its_status(tmp_path: Path, store_url: str) -> None:
    runner, state = launcher(tmp_path, store_url, "import sys; print('run', sys.argv[1]); sys.exit(4)")
    run_id = state.start_run(Decision("fired", "manual", "test", "manual"), new_rows=5, now=time.time())
    runner.start(run_id)
    assert runner.in_progress
    [finished] = wait_finished(runner)
    assert (finished.run_id, finished.status, finished.exit_code) == (run_id, "failed", 4)
    [row] = state.runs()
    assert row["status"] == "failed" and row["exit_code"] == 4 and row["new_rows"] == 5
    assert Path(row["log_path"]).read_text().strip() == f"run {run_id}"  # {run_id} was filled in


def test_a_restarted_controller_adopts_a_live_run_and_marks_a_vanished_one_lost(tmp_path: Path, store_url: str) -> None:
    runner, state = launcher(tmp_path, store_url, "import time; time.sleep(2)")
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


def test_a_reused_pid_is_not_adopted_as_the_run(tmp_path: Path, store_url: str) -> None:
    # After a restart the recorded pid often belongs to another process by then: adopting it held off training
    # for as long as that process lived.
    runner, state = launcher(tmp_path, store_url, "pass")
    decision = Decision("fired", "drift_sustained", "test")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # started now, same pid recorded
    try:
        # The run began 10 min before the stranger; another began 20 min after it, longer than a standby waits.
        for started in (time.time() - 600, time.time() + 1200):
            run_id = state.start_run(decision, 0, started)
            state.run_started(run_id, stranger.pid, tmp_path / "run.log")
        restarted = RunLauncher(runner.config, state)
        assert not restarted.in_progress
        assert [r["status"] for r in state.runs()] == ["lost", "lost"]
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


def warmed(runner: RunLauncher) -> Standby:
    runner.warm()
    standby = runner._standby
    assert standby is not None
    wait_for(lambda: "standby" in standby.log_path.read_text(), 30, "the standby ready")
    return standby


def manual_run(state: ControllerState, now: float | None = None) -> int:
    return state.start_run(Decision("fired", "manual", "test", "manual"), new_rows=5, now=now or time.time())


def test_a_run_is_handed_to_the_warmed_standby_and_none_starts_unless_warmed_again(tmp_path: Path) -> None:
    runner, state = standby_launcher(tmp_path)
    assert runner.poll() == [] and runner._standby is None  # nothing warmed it: no standby
    standby = warmed(runner)
    runner.warm()  # warming again keeps the same one
    assert runner._standby is standby
    run_id = manual_run(state)
    runner.start(run_id)
    [finished] = wait_finished(runner)
    # The standby's exit code, not `command`'s 9.
    assert (finished.run_id, finished.status, finished.exit_code) == (run_id, "rejected", 3)
    [row] = state.runs()
    assert row["pid"] == standby.process.pid
    log_text = Path(row["log_path"]).read_text()
    assert Path(row["log_path"]).name == f"run-{run_id}.log" and f"standby {standby.process.pid}" in log_text
    assert f"run {run_id} handed after" in log_text
    assert runner._standby is None and [p.name for p in (tmp_path / "runs").iterdir()] == [f"run-{run_id}.log"]


def test_a_run_handed_over_whose_log_cannot_be_renamed_is_still_the_standbys_and_tracked(tmp_path: Path) -> None:
    runner, state = standby_launcher(tmp_path)
    standby = warmed(runner)
    standby.log_path.unlink()  # removed under it (a clean-up): the process still writes to the open file
    run_id = manual_run(state)
    runner.start(run_id)
    assert runner.in_progress and state.runs()[0]["pid"] == standby.process.pid
    [finished] = wait_finished(runner)
    assert finished.exit_code == 3


def test_no_standby_beside_a_run_and_a_dead_one_means_a_cold_start(tmp_path: Path) -> None:
    runner, state = standby_launcher(tmp_path)
    runner.config.command = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(4)", "{run_id}"]
    standby = warmed(runner)
    standby.process.kill()  # a standby gone (killed, or out of memory) before the trigger
    standby.process.wait()
    run_id = manual_run(state)
    runner.start(run_id)  # started cold from `command`
    assert state.runs()[0]["pid"] != standby.process.pid and standby.log_path.exists()  # its log kept, for why
    runner.warm()
    assert runner._standby is None  # in progress: no standby beside it
    [finished] = wait_finished(runner)
    assert (finished.run_id, finished.exit_code) == (run_id, 4)
    assert standby.process.stdin is not None and standby.process.stdin.closed
    again = warmed(runner)
    runner.close()
    assert runner._standby is None and again.process.poll() is not None and not again.log_path.exists()


def test_a_standby_no_run_takes_ends_and_one_that_dies_is_not_restarted_at_once(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runner, _ = standby_launcher(tmp_path)
    monkeypatch.setattr(runs, "STANDBY_IDLE_S", 0.5)
    standby = warmed(runner)
    time.sleep(0.6)
    runner.warm()  # drift again: it does not put the end off
    runner.poll()
    assert runner._standby is None and standby.process.poll() is not None  # ended: it held memory for nothing
    crashing = warmed(runner)
    crashing.process.kill()
    crashing.process.wait()
    runner.poll()  # noticed: exited on its own; its log is kept
    runner.warm()
    assert runner._standby is None and crashing.log_path.exists()  # not at once: a crashing standby must not loop


def test_a_custom_run_command_gets_no_default_standby() -> None:
    assert TriggerConfig().standby == ["tuneloop", "train", "--standby"]
    assert TriggerConfig(command=["my-trainer", "{run_id}"]).standby is None
    assert TriggerConfig(command=["my-trainer", "{run_id}"], standby_command=["my-trainer", "--wait"]).standby == [
        "my-trainer", "--wait"]


def test_a_restarted_controller_adopts_a_run_its_standby_began_before_the_run(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUN_S", "5")
    runner, state = standby_launcher(tmp_path)
    warmed(runner)
    run_id = manual_run(state, now=time.time() + 60)  # drift warmed the standby windows before the run's row
    runner.start(run_id)
    restarted = RunLauncher(runner.config, state)
    assert restarted.in_progress and [r["status"] for r in state.runs()] == ["running"]
    wait_finished(runner)
