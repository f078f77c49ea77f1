"""A training worker (tuneloop/worker.py): claims, runs each as a process, a standby handed the next run, and runs
that outlive their worker or die with it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import wait_for
from tuneloop import worker as worker_module
from tuneloop.config import TriggerConfig
from tuneloop.runs import RunQueue
from tuneloop.worker import Standby, Worker

# A stand-in for `tuneloop train --run-id N` as a worker starts it: beats, sleeps RUN_S, records its own end.
RUN = """
import os, sys, time
from tuneloop.runs import RunQueue, heartbeats
run_id = int(sys.argv[1])
queue = RunQueue(os.environ["STORE_URL"])
print("run", run_id, "pid", os.getpid(), flush=True)
with heartbeats(queue, run_id, float(os.environ["TIMEOUT_S"]), lambda: os._exit(1)):
    time.sleep(float(os.environ["RUN_S"]))
queue.finish_by_exit_code(run_id, 0)
"""

# A stand-in for `tuneloop train --standby`: ready at once, then runs whatever run id its stdin names.
STANDBY = """
import os, sys, time
print("standby", os.getpid(), flush=True)
line = sys.stdin.readline()
if not line:
    sys.exit(0)
run_id, started = line.split()
print("run", run_id, "handed after", round(time.time() - float(started), 1), flush=True)
sys.exit(3)
"""


def stand_in_env(monkeypatch: pytest.MonkeyPatch, store_url: str, timeout_s: float, run_s: float) -> None:
    """What RUN reads: its store, its heartbeat timeout, how long it runs."""
    for name, value in {"STORE_URL": store_url, "TIMEOUT_S": timeout_s, "RUN_S": run_s}.items():
        monkeypatch.setenv(name, str(value))


def make_worker(tmp_path: Path, store_url: str, code: str, standby: str | None = None, name: str = "w:1") -> Worker:
    config = TriggerConfig(command=[sys.executable, "-c", code, "{run_id}"], runs_dir=tmp_path / "runs",
                           standby_command=[sys.executable, "-c", standby] if standby else None)
    return Worker(config, RunQueue(store_url), name)


def request(worker: Worker) -> int:
    return worker.queue.request("manual", "test", new_rows=5, now=time.time())


def wait_ended(queue: RunQueue, run_id: int, step: Worker | None = None, timeout: float = 30) -> dict:
    def ended() -> bool:
        if step is not None:
            step.step()
        row = queue.get(run_id)
        return row is not None and row["status"] not in ("requested", "running")

    wait_for(ended, timeout, f"run {run_id} to end", interval=0.1)
    row = queue.get(run_id)
    assert row is not None
    return row


def test_a_claimed_run_is_a_process_whose_exit_code_decides_a_silent_end(tmp_path: Path, store_url: str) -> None:
    worker = make_worker(tmp_path, store_url, "import sys; print('run', sys.argv[1]); sys.exit(4)")
    assert worker.step() is None  # nothing requested
    run_id = request(worker)
    assert worker.step() == run_id and worker.busy
    row = wait_ended(worker.queue, run_id, worker)
    assert (row["status"], row["exit_code"], row["worker"]) == ("failed", 4, "w:1")
    assert "without recording its end" in row["detail"]
    assert Path(row["log_path"]).read_text().strip() == f"run {run_id}"  # {run_id} was filled in
    assert not worker.busy


def test_a_run_outlives_its_worker_and_records_its_own_end(tmp_path: Path, store_url: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_env(monkeypatch, store_url, timeout_s=1.2, run_s=2)
    worker = make_worker(tmp_path, store_url, RUN)
    run_id = request(worker)
    worker.step()
    del worker  # the worker stops (a restart, a pod replaced); the run goes on, beating
    queue = RunQueue(store_url)
    time.sleep(1.5)
    assert queue.expire(timeout_s=1.2) == []
    row = wait_ended(queue, run_id)
    assert (row["status"], row["exit_code"]) == ("succeeded", 0)


def test_a_run_killed_with_its_worker_is_failed_by_its_silence_and_the_next_run_proceeds(
        tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_env(monkeypatch, store_url, timeout_s=1.2, run_s=30)
    doomed = make_worker(tmp_path, store_url, RUN, name="doomed:1")
    run_id = request(doomed)
    doomed.step()
    assert doomed._run is not None
    pid = doomed._run[1].pid
    wait_for(lambda: f"pid {pid}" in (tmp_path / "runs" / f"run-{run_id}.log").read_text(), 30, "the run to start")
    os.kill(pid, signal.SIGKILL)  # the host is gone: run and worker with it (this worker is never stepped again)
    queue = RunQueue(store_url)
    wait_for(lambda: queue.expire(timeout_s=1.2) == [run_id], 10, "the silent run to be failed")
    row = queue.get(run_id)
    assert row is not None and row["status"] == "failed" and row["exit_code"] is None
    monkeypatch.setenv("RUN_S", "0.2")
    survivor = make_worker(tmp_path, store_url, RUN, name="survivor:1")
    next_run = request(survivor)
    assert survivor.step() == next_run
    assert wait_ended(queue, next_run, survivor)["status"] == "succeeded"


def test_a_withdrawn_run_stops_at_its_next_beat(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_env(monkeypatch, store_url, timeout_s=0.6, run_s=30)
    worker = make_worker(tmp_path, store_url, RUN)
    run_id = request(worker)
    worker.step()
    wait_for(lambda: "pid" in (tmp_path / "runs" / f"run-{run_id}.log").read_text(), 30, "the run to start")
    worker.queue.finish(run_id, "failed", None, "as the controller's expiry does, to a run cut off too long")
    assert worker._run is not None
    assert worker._run[1].wait(timeout=5) == 1  # stopped itself, without waiting 30 s to publish


def test_the_worker_beats_for_a_run_that_cannot_yet_and_stops_it_once_withdrawn(tmp_path: Path, store_url: str) -> None:
    # A standby still importing torch (20 s and more under load) cannot beat: the claim alone expired such runs.
    worker = make_worker(tmp_path, store_url, "import time; time.sleep(60)")
    worker.config.heartbeat_timeout_s = 1.2
    run_id = request(worker)
    worker.step()
    for _ in range(15):
        time.sleep(0.1)
        worker.step()
    assert worker.queue.expire(timeout_s=1.2) == []  # the worker beat for it
    worker.queue.finish(run_id, "failed", None, "withdrawn by the test")
    time.sleep(0.25)  # the next beat is due
    worker.step()
    assert worker._run is None or worker._run[1].poll() is not None  # stopped, not left to publish
    assert worker.queue.get(run_id)["status"] == "failed"  # type: ignore[index]


def warmed(worker: Worker) -> Standby:
    worker.warm()
    standby = worker._standby
    assert standby is not None
    wait_for(lambda: "standby" in standby.log_path.read_text(), 30, "the standby ready")
    return standby


def test_a_run_is_handed_to_the_warmed_standby(tmp_path: Path, store_url: str) -> None:
    worker = make_worker(tmp_path, store_url, "import sys; sys.exit(9)", STANDBY)
    worker.step()
    assert worker._standby is None  # nothing warmed it: no standby
    standby = warmed(worker)
    worker.warm()  # warming again keeps the same one
    assert worker._standby is standby
    run_id = request(worker)
    worker.step()
    row = wait_ended(worker.queue, run_id, worker)
    assert (row["status"], row["exit_code"], row["pid"]) == ("rejected", 3, standby.process.pid)  # not command's 9
    log_text = Path(row["log_path"]).read_text()
    assert Path(row["log_path"]).name == f"run-{run_id}.log" and f"standby {standby.process.pid}" in log_text
    assert f"run {run_id} handed after" in log_text
    assert worker._standby is None and [p.name for p in (tmp_path / "runs").iterdir()] == [f"run-{run_id}.log"]


def test_a_run_handed_over_whose_log_cannot_be_renamed_is_still_the_standbys(tmp_path: Path, store_url: str) -> None:
    worker = make_worker(tmp_path, store_url, "import sys; sys.exit(9)", STANDBY)
    standby = warmed(worker)
    standby.log_path.unlink()  # removed under it (a clean-up): the process still writes to the open file
    run_id = request(worker)
    worker.step()
    assert worker.busy and worker.queue.get(run_id)["pid"] == standby.process.pid  # type: ignore[index]
    assert wait_ended(worker.queue, run_id, worker)["exit_code"] == 3


def test_no_standby_beside_a_run_and_a_dead_one_means_a_cold_start(tmp_path: Path, store_url: str) -> None:
    worker = make_worker(tmp_path, store_url, "import sys, time; time.sleep(1); sys.exit(4)", STANDBY)
    standby = warmed(worker)
    standby.process.kill()  # a standby gone (killed, or out of memory) before the trigger
    standby.process.wait()
    run_id = request(worker)
    worker.step()  # started cold from `command`
    assert worker.queue.get(run_id)["pid"] != standby.process.pid  # type: ignore[index]
    assert standby.log_path.exists()  # its log kept, for why
    worker.warm()
    assert worker._standby is None  # in progress: no standby beside it
    assert wait_ended(worker.queue, run_id, worker)["exit_code"] == 4
    assert standby.process.stdin is not None and standby.process.stdin.closed
    again = warmed(worker)
    worker.close()
    assert worker._standby is None and again.process.poll() is not None and not again.log_path.exists()


def test_a_standby_no_run_takes_ends_and_one_that_dies_is_not_restarted_at_once(
        tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker(tmp_path, store_url, "pass", STANDBY)
    monkeypatch.setattr(worker_module, "STANDBY_IDLE_S", 0.5)
    standby = warmed(worker)
    time.sleep(0.6)
    worker.step()
    assert worker._standby is None and standby.process.poll() is not None  # ended: it held memory for nothing
    crashing = warmed(worker)
    crashing.process.kill()
    crashing.process.wait()
    worker.step()  # noticed: exited on its own; its log is kept
    worker.warm()
    assert worker._standby is None and crashing.log_path.exists()  # not at once: a crashing standby must not loop


def test_a_custom_run_command_gets_no_default_standby() -> None:
    assert TriggerConfig().standby == ["tuneloop", "train", "--standby"]
    assert TriggerConfig(command=["my-trainer", "{run_id}"]).standby is None
    assert TriggerConfig(command=["my-trainer", "{run_id}"], standby_command=["my-trainer", "--wait"]).standby == [
        "my-trainer", "--wait"]
