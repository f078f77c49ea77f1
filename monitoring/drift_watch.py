"""From stored predictions to training runs: drift windows, the trigger policy, run requests.

Stored prediction events feed the drift windows (`monitoring.windows`); each closed window is
exported as metrics, recorded, and handed to the trigger policy (`monitoring.trigger`). A fired
decision requests a training run (`tuneloop.runs`), which a worker claims: the controller's own
(`trigger.local_worker`, stepped here) or `tuneloop trainer` on another host. Runs whose heartbeat
stopped are marked failed here. A manual request (the admin endpoint, another thread) is queued and
decided on the controller's loop, like the others.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from monitoring.metrics import DriftMetrics
from monitoring.state import ControllerState
from monitoring.trigger import DAY_S, Decision, TriggerPolicy, TriggerState
from monitoring.windows import WindowMonitor, WindowReport
from tuneloop.clock import unix_seconds, utc_iso
from tuneloop.config import Settings
from tuneloop.events import PredictionEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.reference import REFERENCE_FILE, Reference
from tuneloop.registry import Registry, RegistryError
from tuneloop.runs import ACTIVE, RunQueue
from tuneloop.worker import Worker

log = logging.getLogger("tuneloop.controller")

ManualRequest = tuple[str, Future[tuple[Decision, int | None]]]


class DriftWatch:
    def __init__(
        self, settings: Settings, registry: Registry, store: FeedbackStore, state: ControllerState, metrics: DriftMetrics
    ) -> None:
        self.trigger_config = settings.trigger
        self.registry = registry
        self.store = store
        self.state = state
        self.metrics = metrics
        self.monitor = WindowMonitor(settings.drift, self._reference, store.recent_labelled)
        self.policy = TriggerPolicy(settings.trigger, started_at=time.time())
        self.runs: RunQueue = state.run_queue
        self.worker = Worker(settings.trigger, self.runs) if settings.trigger.local_worker else None
        self._manual: queue.Queue[ManualRequest] = queue.Queue()
        self._active = {r["id"] for r in self.runs.active()}  # runs whose end is yet to be counted
        self.metrics.runs_in_progress.set(int(bool(self._active)))
        last = self.runs.last_started()
        if last is not None:
            self.metrics.last_run_started.set(last)

    def _reference(self, version: int) -> Reference | None:
        try:
            manifest, directory = self.registry.resolve(version)
        except RegistryError as exc:
            log.warning("cannot read the drift reference of v%s: %s", version, exc)
            return None
        path = directory / REFERENCE_FILE
        return Reference.load(path, manifest.labels) if path.is_file() else None

    def collect_finished_runs(self) -> None:
        """Step the local worker; fail the runs that stopped beating; count and log the runs that ended."""
        if self.worker is not None:
            self.worker.step()
        config = self.trigger_config
        for run_id in self.runs.expire(config.heartbeat_timeout_s, config.claim_timeout_s):
            log.warning("training run %s failed: no heartbeat in %g s, or no worker claimed it in %g s",
                        run_id, config.heartbeat_timeout_s, config.claim_timeout_s)
        if not self._active:
            return
        for run_id in sorted(self._active):
            run = self.runs.get(run_id)
            if run is None or run["status"] in ACTIVE:
                continue
            self._active.discard(run_id)
            self.metrics.runs.labels(run["status"]).inc()
            log.log(logging.INFO if run["status"] == "succeeded" else logging.WARNING,
                    "training run %s %s (exit code %s%s)", run_id, run["status"], run["exit_code"],
                    f"; {run['detail']}" if run["detail"] else "")
        self.metrics.runs_in_progress.set(int(bool(self._active)))

    def close(self) -> None:
        """End the local worker's standby, if any; a run in progress goes on."""
        if self.worker is not None:
            self.worker.close()

    def observe(self, predictions: list[PredictionEvent]) -> None:
        """Windows closed by these events, then what is due: a waiting or scheduled run, manual requests."""
        started = time.perf_counter()
        # Shadow scores describe a candidate nobody was answered by; the windows watch what was served.
        reports = self.monitor.observe([p for p in predictions if not p.shadow])
        if reports:
            self.metrics.window_seconds.observe((time.perf_counter() - started) / len(reports))
        for report in reports:
            self._on_window(report)
        # The state costs a few queries: only while a drift run waits for feedback to pause, or a schedule is on.
        if self.policy.armed or self.trigger_config.schedule_interval_s:
            state = self._trigger_state()
            scheduled = self.policy.on_tick(state)
            if scheduled is not None:
                self._act(scheduled, state)
        while not self._manual.empty():
            reason, answer = self._manual.get_nowait()
            state = self._trigger_state()
            decision = self.policy.on_manual(state, reason)
            answer.set_result((decision, self._act(decision, state)))

    def request_manual(self, reason: str, timeout_s: float = 30.0) -> tuple[Decision, int | None]:
        """From another thread: ask the loop for a run; returns its decision and the run id if one started."""
        answer: Future[tuple[Decision, int | None]] = Future()
        self._manual.put((reason, answer))
        try:
            return answer.result(timeout=timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"the controller loop did not answer within {timeout_s:g} s; is the event bus up?") from None

    def _on_window(self, report: WindowReport) -> None:
        self._export(report)
        self.state.record_window(report)
        version = report.model_version
        state = self._trigger_state()
        decision = self.policy.on_window(version, report.drifted(self.trigger_config.signals), state)
        self.metrics.consecutive.labels(str(version)).set(self.policy.consecutive(version))
        self._act(decision, state)
        if self.worker is not None and self.policy.run_expected(decision, state):
            self.worker.warm()  # a run may start within a few windows: its libraries load meanwhile

    def _export(self, report: WindowReport) -> None:
        version = str(report.model_version)
        for signal in report.signals:
            self.metrics.drift_value.labels(signal.name, version).set(signal.value)
            self.metrics.drift_threshold.labels(signal.name, version).set(signal.threshold)
            self.metrics.drift_detected.labels(signal.name, version).set(int(signal.drifted))
            if signal.p_value is not None:
                self.metrics.drift_p_value.labels(signal.name, version).set(signal.p_value)
        for label, recall in report.recall.items():
            self.metrics.feedback_recall.labels(label, version).set(recall)
        self.metrics.feedback_rows.labels(version).set(report.feedback_rows)
        self.metrics.windows.labels(version, str(bool(report.drifted())).lower()).inc()

    def _trigger_state(self) -> TriggerState:
        now = time.time()
        last = self.runs.last_started()
        newest = self.store.last_stored_at()
        return TriggerState(
            now=now,
            new_rows=self.store.count_stored_since(utc_iso(last) if last is not None else None),
            last_run_started=last,
            runs_last_day=self.runs.started_since(now - DAY_S),
            run_in_progress=bool(self._active),
            rollout_in_progress=self.registry.rollout() is not None,
            last_row_stored=unix_seconds(newest) if newest else None,
        )

    def _act(self, decision: Decision, state: TriggerState) -> int | None:
        """Count and log every decision; record the ones that did or could have started a run; request it."""
        self.metrics.decisions.labels(decision.source, decision.outcome, decision.reason).inc()
        if decision.outcome == "none":
            log.debug("trigger: %s", decision.detail)
            return None
        self.state.record_decision(decision)
        log.log(logging.WARNING if decision.fired else logging.INFO, "trigger %s (%s): %s",
                decision.outcome, decision.reason, decision.detail)
        if not decision.fired:
            return None
        run_id = self.runs.request(decision.source, decision.detail, state.new_rows, state.now)
        self._active.add(run_id)
        self.metrics.last_run_started.set(state.now)
        self.metrics.runs.labels("started").inc()
        self.metrics.runs_in_progress.set(1)
        if self.worker is not None:
            try:
                self.worker.step()  # claims it at once
            except Exception:  # the store away: the next step claims it; a manual request still gets its answer
                log.exception("training run %s requested; the local worker could not claim it yet", run_id)
        return run_id
