"""Training runs as their own processes: started by the controller, watched until they exit.

A run is a separate process (by default `tuneloop train --run-id N`), so a crash in training
never takes the controller down, and a controller restart does not kill a run: the next
controller adopts it by pid and waits for it to go, once the process with that pid is shown to
be the run (it started when the run did; after a restart a pid is often another process's).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from monitoring.state import ControllerState
from tuneloop.config import TriggerConfig
from tuneloop.errors import RUN_STATUS  # `tuneloop train`'s exit codes; any other is a failure

log = logging.getLogger("tuneloop.runs")


@dataclass(frozen=True)
class FinishedRun:
    run_id: int
    status: str  # succeeded, rejected, skipped, failed or lost
    exit_code: int | None


# A run's process starts right after its row is written; a process that started later holds a reused pid.
START_TOLERANCE_S = 30.0


def process_start_unix(pid: int) -> float | None:
    """When a process started, in unix seconds (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3, after the name
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _is_the_run(pid: int | None, started_unix: float) -> bool:
    if not pid or not _alive(pid):
        return False
    start = process_start_unix(pid)
    return start is None or started_unix - 2 <= start <= started_unix + START_TOLERANCE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLauncher:
    def __init__(self, config: TriggerConfig, state: ControllerState) -> None:
        self.config = config
        self.state = state
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._adopted: dict[int, int] = {}  # run id -> pid of a run an earlier controller started
        for run in state.running():
            if _is_the_run(run["pid"], run["started_unix"]):
                self._adopted[run["id"]] = run["pid"]
            else:
                state.finish_run(run["id"], "lost", None)
                log.warning("training run %s was running when the controller stopped and is gone", run["id"])

    @property
    def in_progress(self) -> bool:
        return bool(self._children or self._adopted)

    def start(self, run_id: int) -> None:
        command = [part.replace("{run_id}", str(run_id)) for part in self.config.command]
        # `tuneloop` is found on PATH, or beside this interpreter (a virtualenv not on PATH).
        if "/" not in command[0] and not shutil.which(command[0]):
            sibling = Path(sys.executable).with_name(command[0])
            command[0] = str(sibling) if sibling.is_file() else command[0]
        self.config.runs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.runs_dir / f"run-{run_id}.log"
        with log_path.open("ab") as out:
            try:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                out.write(f"cannot start {command}: {exc}\n".encode())
                self.state.finish_run(run_id, "failed", None)
                raise
        self._children[run_id] = process
        self.state.run_started(run_id, process.pid, log_path)
        log.info("training run %s started (pid %s): %s; log %s", run_id, process.pid, " ".join(command), log_path)

    def poll(self) -> list[FinishedRun]:
        finished = []
        for run_id, process in list(self._children.items()):
            code = process.poll()
            if code is not None:
                del self._children[run_id]
                finished.append(FinishedRun(run_id, RUN_STATUS.get(code, "failed"), code))
        for run_id, pid in list(self._adopted.items()):
            if not _alive(pid):
                del self._adopted[run_id]
                finished.append(FinishedRun(run_id, "lost", None))  # not our child: its exit code is unknowable
        for run in finished:
            self.state.finish_run(run.run_id, run.status, run.exit_code)
        return finished
