"""From stored predictions to training runs: drift windows, the trigger policy, runs as processes.

Stored prediction events feed the drift windows (`monitoring.windows`); each closed window is
exported as metrics, recorded, and handed to the trigger policy (`monitoring.trigger`). A fired
decision starts a training run as its own process (`monitoring.runs`). A manual request (the
admin endpoint, another thread) is queued and decided on the controller's loop, like the others.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from monitoring.metrics import DriftMetrics
from monitoring.runs import RunLauncher
from monitoring.state import ControllerState
from monitoring.trigger import DAY_S, Decision, TriggerPolicy, TriggerState
from monitoring.windows import WindowMonitor, WindowReport
from tuneloop.clock import unix_seconds, utc_iso
from tuneloop.config import Settings
from tuneloop.events import PredictionEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.reference import REFERENCE_FILE, Reference
from tuneloop.registry import Registry, RegistryError

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
        self.launcher = RunLauncher(settings.trigger, state)
        self._manual: queue.Queue[ManualRequest] = queue.Queue()
        self.metrics.runs_in_progress.set(int(self.launcher.in_progress))
        last = state.last_run_started()
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
        for run in self.launcher.poll():
            self.metrics.runs.labels(run.status).inc()
            log.log(logging.INFO if run.status == "succeeded" else logging.WARNING,
                    "training run %s %s (exit code %s)", run.run_id, run.status, run.exit_code)

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
        self.metrics.runs_in_progress.set(int(self.launcher.in_progress))

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
        if self.policy.run_expected(decision, state):
            self.launcher.warm()  # a run may start within a few windows: its libraries load meanwhile

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
        last = self.state.last_run_started()
        newest = self.store.last_stored_at()
        return TriggerState(
            now=now,
            new_rows=self.store.count_stored_since(utc_iso(last) if last is not None else None),
            last_run_started=last,
            runs_last_day=self.state.runs_since(now - DAY_S),
            run_in_progress=self.launcher.in_progress,
            rollout_in_progress=self.registry.rollout() is not None,
            last_row_stored=unix_seconds(newest) if newest else None,
        )

    def _act(self, decision: Decision, state: TriggerState) -> int | None:
        """Count and log every decision; record the ones that did or could have started a run; start it."""
        self.metrics.decisions.labels(decision.source, decision.outcome, decision.reason).inc()
        if decision.outcome == "none":
            log.debug("trigger: %s", decision.detail)
            return None
        self.state.record_decision(decision)
        log.log(logging.WARNING if decision.fired else logging.INFO, "trigger %s (%s): %s",
                decision.outcome, decision.reason, decision.detail)
        if not decision.fired:
            return None
        run_id = self.state.start_run(decision, state.new_rows, state.now)
        self.metrics.last_run_started.set(state.now)
        try:
            self.launcher.start(run_id)
        except OSError:
            self.metrics.runs.labels("failed").inc()
            log.exception("training run %s could not start", run_id)
            return run_id
        self.metrics.runs.labels("started").inc()
        return run_id
