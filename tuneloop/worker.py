"""A training worker: claims the runs the controller requests and runs each as its own process.

One worker runs one run at a time: it claims the oldest request (`tuneloop.runs`), starts
`trigger.command` (`tuneloop train --run-id N`) in a new session with its log in `trigger.runs_dir`, and records
the exit of a process that died without recording its own end. The worker beats for the run while its process
lives (a process still importing torch cannot yet beat itself); the run beats and records its end itself too, so
a worker that stops (or restarts) leaves it running.

Where it runs: inside the controller's process (`trigger.local_worker`, the embedded default: the controller
steps it on its loop), or as `tuneloop trainer` on another host, a GPU one, beside the same store, registry and
event bus.

Importing torch, peft and the exporters takes a run about 20 s before its first step, so a worker warms a
`Standby` (`trigger.standby_command`, `tuneloop train --standby`): a process that does that work ahead, then
waits on its stdin for a run id, which the next run hands it. Inside the controller a standby is warmed when
drift calls for a run a few windows later (it holds about 1 GB beside the service); `tuneloop trainer`, on a host
of its own, keeps one warm. One that no run took ends after STANDBY_IDLE_S.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tuneloop.config import TriggerConfig
from tuneloop.processes import stop_process_group
from tuneloop.runs import HEARTBEATS_PER_TIMEOUT, ClaimedRun, RunQueue

log = logging.getLogger("tuneloop.worker")

STANDBY_IDLE_S = 900.0  # a standby no run took for this long ends: it holds about 1 GB
STANDBY_RETRY_S = 60.0  # after a standby exits on its own, wait this long before starting another
CLAIM_INTERVAL_S = 1.0  # how often `tuneloop trainer` looks for a request


class Standby:
    """A training process started ahead (`trigger.standby_command`): handed one run, or ended unused."""

    def __init__(self, command: list[str], runs_dir: Path) -> None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = runs_dir / f"standby-{time.time_ns()}.log"  # the run's log, once handed one
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(_resolved(command), stdin=subprocess.PIPE, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.ends_at = time.monotonic() + STANDBY_IDLE_S

    def hand(self, run: ClaimedRun, log_path: Path) -> bool:
        """Run `run`, logging to `log_path`; False when this process has exited (it ended, and is reaped)."""
        if self.process.poll() is None:
            try:
                self.log_path = self.log_path.rename(log_path)  # the process keeps writing to the same file
            except OSError as exc:
                log.warning("the standby's log %s keeps its name (%s)", self.log_path, exc)
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(f"{run.run_id} {run.started_unix}\n".encode())
                self.process.stdin.close()  # from here the run needs no worker
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


class Worker:
    def __init__(self, config: TriggerConfig, queue: RunQueue, name: str | None = None) -> None:
        self.config = config
        self.queue = queue
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._run: tuple[int, subprocess.Popen[bytes]] | None = None  # the run this worker started, while it lives
        self._standby: Standby | None = None
        self._standby_after = 0.0  # monotonic time before which no standby starts
        self._next_beat = 0.0

    @property
    def busy(self) -> bool:
        return self._run is not None

    def step(self) -> int | None:
        """Record the end of a run that died silently; claim and start the next request. Returns the run started."""
        self._reap()
        self._beat()
        run = self.queue.claim(self.name) if self._run is None else None
        if run is not None:
            self._start(run)  # a standby found dead here is a cold start, not a crash to back off from
        self._check_standby()
        return run.run_id if run else None

    def run(self, stop: threading.Event, keep_warm: bool = True) -> None:
        """`tuneloop trainer`: claim and run until stopped (a run in progress goes on without it)."""
        log.info("worker %s waiting for training runs", self.name)
        try:
            while not stop.is_set():
                try:
                    self.step()
                    if keep_warm:
                        self.warm()
                except Exception as exc:  # the store away: try again, nothing claimed is lost
                    log.warning("worker step failed (%r); trying again in %g s", exc, CLAIM_INTERVAL_S)
                stop.wait(CLAIM_INTERVAL_S)
        finally:
            self.close()

    def _start(self, run: ClaimedRun) -> None:
        log_path = self.config.runs_dir / f"run-{run.run_id}.log"
        try:
            self.config.runs_dir.mkdir(parents=True, exist_ok=True)
            log_path.touch()
        except OSError as exc:  # no process will beat for it: end it now, not a heartbeat timeout later
            self.queue.finish(run.run_id, "failed", None, f"cannot write its log {log_path}: {exc}")
            log.error("training run %s could not start: cannot write %s (%s)", run.run_id, log_path, exc)
            return
        standby, self._standby = self._standby, None
        if standby is not None and standby.hand(run, log_path):
            process, log_path = standby.process, standby.log_path
            log.info("training run %s handed to the standby (pid %s); log %s", run.run_id, process.pid, log_path)
        else:
            if standby is not None:
                log.warning("the standby training process had exited (%s; see %s): run %s starts cold",
                            standby.process.returncode, standby.log_path, run.run_id)
            command = _resolved([part.replace("{run_id}", str(run.run_id)) for part in self.config.command])
            with log_path.open("ab") as out:
                try:
                    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                except OSError as exc:
                    out.write(f"cannot start {command}: {exc}\n".encode())
                    self.queue.finish(run.run_id, "failed", None, f"cannot start {command[0]}: {exc}")
                    log.error("training run %s could not start: %s", run.run_id, exc)
                    return
            log.info("training run %s started (pid %s): %s; log %s", run.run_id, process.pid, " ".join(command),
                     log_path)
        self._run = (run.run_id, process)
        self.queue.started(run.run_id, process.pid, log_path)

    def _beat(self) -> None:
        """Beat for the run while its process lives: until the run beats itself (a standby still importing, a cold
        start's first 20 s) and beside it. A run withdrawn meanwhile is stopped."""
        if self._run is None or time.monotonic() < self._next_beat:
            return
        self._next_beat = time.monotonic() + self.config.heartbeat_timeout_s / HEARTBEATS_PER_TIMEOUT
        run_id, process = self._run
        if not self.queue.heartbeat(run_id):
            log.warning("training run %s was withdrawn (no heartbeat in time); stopping its process", run_id)
            stop_process_group(process, timeout=10)

    def _reap(self) -> None:
        if self._run is None:
            return
        run_id, process = self._run
        code = process.poll()
        if code is None:
            return
        if self.queue.finish_by_exit_code(run_id, code, f"exited with {code} without recording its end"):
            log.warning("training run %s exited with %s without recording its end", run_id, code)
        self._run = None  # only once its end is recorded: a store away now is tried again next step

    def warm(self) -> None:
        """A run may start soon: have a standby import what it needs (none beside a run in progress, which it
        would compete with for the CPU)."""
        command = self.config.standby
        if not command or self._run is not None or self._standby is not None or time.monotonic() < self._standby_after:
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
        """End the standby, if any (a run in progress goes on)."""
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.end()
            standby.log_path.unlink(missing_ok=True)  # it said only that it was ready

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
