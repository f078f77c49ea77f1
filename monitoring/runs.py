"""Training runs as their own processes: started by the controller, watched until they exit.

A run is a separate process (by default `tuneloop train --run-id N`), so a crash in training
never takes the controller down, and a controller restart does not kill a run: the next
controller adopts it by pid and waits for it to go, once the process with that pid is shown to
be the run (it started when the run did, or as its standby before; after a restart a pid is often another
process's).

Importing torch, peft and the exporters takes a run about 20 s before its first step. Drift seen in one
window calls for a run a few windows later, so the controller then warms a `Standby`
(`trigger.standby_command`, `tuneloop train --standby`): a process that does that work while the trigger
waits, then waits on its stdin for a run id, which the next run hands it. One no run took ends after
STANDBY_IDLE_S.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from monitoring.state import ControllerState
from tuneloop.config import TriggerConfig
from tuneloop.errors import RUN_STATUS  # `tuneloop train`'s exit codes; any other is a failure
from tuneloop.processes import stop_process_group

log = logging.getLogger("tuneloop.runs")


@dataclass(frozen=True)
class FinishedRun:
    run_id: int
    status: str  # succeeded, rejected, skipped, failed or lost
    exit_code: int | None


# A run's process starts right after its row is written, or up to STANDBY_IDLE_S before it (a standby); a
# process that started outside that span holds a reused pid.
START_TOLERANCE_S = 30.0
STANDBY_IDLE_S = 900.0  # a standby no run took for this long ends: it holds about 1 GB
STANDBY_RETRY_S = 60.0  # after a standby exits on its own, wait this long before starting another


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
    earliest = started_unix - STANDBY_IDLE_S - START_TOLERANCE_S
    return start is None or earliest <= start <= started_unix + START_TOLERANCE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Standby:
    """A training process started ahead (`trigger.standby_command`): handed one run, or ended unused."""

    def __init__(self, command: list[str], runs_dir: Path) -> None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = runs_dir / f"standby-{time.time_ns()}.log"  # the run's log, once handed one
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(_resolved(command), stdin=subprocess.PIPE, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.ends_at = time.monotonic() + STANDBY_IDLE_S

    def hand(self, run_id: int, log_path: Path) -> bool:
        """Run `run_id`, logging to `log_path`; False when this process has exited (it ended, and is reaped)."""
        if self.process.poll() is None:
            try:
                self.log_path = self.log_path.rename(log_path)  # the process keeps writing to the same file
            except OSError as exc:
                log.warning("the standby's log %s keeps its name (%s)", self.log_path, exc)
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(f"{run_id} {time.time()}\n".encode())
                self.process.stdin.close()  # from here the run needs no controller: a restarted one adopts it
                return True
            except OSError:  # it exited meanwhile
                pass
        self.end()
        return False

    def end(self) -> None:
        """Close its stdin, on which it exits; make sure it is gone and reaped."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.process.poll() is None:
            stop_process_group(self.process, timeout=10)


class RunLauncher:
    def __init__(self, config: TriggerConfig, state: ControllerState) -> None:
        self.config = config
        self.state = state
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._adopted: dict[int, int] = {}  # run id -> pid of a run an earlier controller started
        self._standby: Standby | None = None
        self._standby_after = 0.0  # monotonic time before which no standby starts
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
        self.config.runs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.runs_dir / f"run-{run_id}.log"
        standby, self._standby = self._standby, None
        if standby is not None and standby.hand(run_id, log_path):
            process, log_path = standby.process, standby.log_path
            log.info("training run %s handed to the standby (pid %s); log %s", run_id, process.pid, log_path)
        else:
            if standby is not None:
                log.warning("the standby training process had exited (%s; see %s): run %s starts cold",
                            standby.process.returncode, standby.log_path, run_id)
            command = _resolved([part.replace("{run_id}", str(run_id)) for part in self.config.command])
            with log_path.open("ab") as out:
                try:
                    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                except OSError as exc:
                    out.write(f"cannot start {command}: {exc}\n".encode())
                    self.state.finish_run(run_id, "failed", None)
                    raise
            log.info("training run %s started (pid %s): %s; log %s", run_id, process.pid, " ".join(command), log_path)
        self._children[run_id] = process
        self.state.run_started(run_id, process.pid, log_path)

    def warm(self) -> None:
        """A run may start soon: have a standby import what it needs (none beside a run in progress, which it
        would compete with for the CPU)."""
        command = self.config.standby
        if not command or self.in_progress or self._standby is not None or time.monotonic() < self._standby_after:
            return
        try:
            self._standby = Standby(list(command), self.config.runs_dir)
        except OSError as exc:
            log.warning("cannot start the standby training process %s: %s", command, exc)
            self._standby_after = time.monotonic() + STANDBY_RETRY_S
            return
        log.info("standby training process started (pid %s); log %s", self._standby.process.pid,
                 self._standby.log_path)

    def close(self) -> None:
        """End the standby, if any (a run in progress goes on; the next controller adopts it)."""
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.end()
            standby.log_path.unlink(missing_ok=True)  # it said only that it was ready

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
        self._check_standby()
        return finished

    def _check_standby(self) -> None:
        """Notice a standby that exited on its own (its log kept); end one no run took in STANDBY_IDLE_S."""
        if self._standby is None:
            return
        code = self._standby.process.poll()
        if code is not None:
            log.warning("the standby training process exited with %s; see %s", code, self._standby.log_path)
            self._standby.end()
            self._standby, self._standby_after = None, time.monotonic() + STANDBY_RETRY_S
        elif time.monotonic() > self._standby.ends_at:
            log.info("no run in %.0f s: the standby training process ends", STANDBY_IDLE_S)
            self.close()


def _resolved(command: list[str]) -> list[str]:
    """`tuneloop` is found on PATH, or beside this interpreter (a virtualenv not on PATH)."""
    if "/" not in command[0] and not shutil.which(command[0]):
        sibling = Path(sys.executable).with_name(command[0])
        command[0] = str(sibling) if sibling.is_file() else command[0]
    return command
