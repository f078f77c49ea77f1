"""Training runs as processes (monitoring/runs.py): exit codes, adoption by a restarted controller, reused pids."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from monitoring.runs import RunLauncher
from monitoring.state import ControllerState
from monitoring.trigger import Decision
from tests.support.processes import wait_for
from tuneloop.config import TriggerConfig


def launcher(tmp_path: Path, code: str) -> tuple[RunLauncher, ControllerState]:
    state = ControllerState(tmp_path / "state.db")
    config = TriggerConfig(command=[sys.executable, "-c", code, "{run_id}"], runs_dir=tmp_path / "runs")
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
