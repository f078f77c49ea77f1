"""The controller: consumes prediction and feedback events into the feedback store, watches drift,
and starts training runs when the trigger policy says so.

Each polled batch is written in one store transaction; malformed messages and feedback whose
prediction never arrived are sent to the dead-letter topic with a reason; only then are the
offsets committed. A crash anywhere before the commit redelivers the batch, and the store's
keys turn the redelivery into counted duplicates, so nothing is stored twice or lost.

Stored prediction events also feed the drift windows (`monitoring.windows`); each closed window
is exported as metrics, recorded, and handed to the trigger policy (`monitoring.trigger`). A fired
decision starts a training run as its own process (`monitoring.runs`).

A candidate in shadow or canary is judged on live feedback against the stable version
(`monitoring.rollout`); the controller advances, promotes or rolls it back in the registry and
announces the change on the model topic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from monitoring.admin import ControllerStatus, admin_app
from monitoring.rollout import Comparison, Verdict, compare_paired, compare_unpaired, judge
from monitoring.runs import RunLauncher
from monitoring.state import ControllerState, iso
from monitoring.windows import WindowMonitor, WindowReport
from monitoring.trigger import DAY_S, Decision, TriggerPolicy, TriggerState

from tuneloop.bus import Bus, Consumer, Record, announce, open_bus
from tuneloop.config import Settings
from tuneloop.events import DeadLetter, FeedbackEvent, ModelEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.reference import REFERENCE_FILE, Reference
from tuneloop.registry import Registry, RegistryError, Rollout

log = logging.getLogger("tuneloop.controller")

# Fault injection for tests only: exit right after the store write, before the offset commit.
# A real SIGKILL cannot be aimed at that instant reliably, so the tests simulate the crash there.
FAULT_ENV = "TUNELOOP_CONTROLLER_FAULT"


@dataclass(frozen=True)
class ControllerMetrics:
    consumed: Any
    stored: Any
    duplicates: Any
    dead_lettered: Any
    pending: Any
    lag: Any
    drift_value: Any
    drift_threshold: Any
    drift_p_value: Any
    drift_detected: Any
    windows: Any
    window_seconds: Any
    feedback_recall: Any
    feedback_rows: Any
    consecutive: Any
    decisions: Any
    runs: Any
    runs_in_progress: Any
    last_run_started: Any
    rollout_accuracy: Any
    rollout_rows: Any
    rollout_p_worse: Any
    rollout_stage: Any
    rollout_verdicts: Any


ROLLOUT_STAGES = ("shadow", "canary")


def controller_metrics() -> ControllerMetrics:
    import prometheus_client as prom

    return ControllerMetrics(
        consumed=prom.Counter("tuneloop_controller_consumed_total", "Messages consumed, by topic.", ["topic"]),
        stored=prom.Counter("tuneloop_controller_feedback_stored_total", "Feedback rows written to the store."),
        duplicates=prom.Counter(
            "tuneloop_controller_duplicates_skipped_total", "Redelivered or resent feedback that was already stored."
        ),
        dead_lettered=prom.Counter(
            "tuneloop_controller_dead_lettered_total", "Messages sent to the dead-letter topic, by reason.", ["reason"]
        ),
        pending=prom.Gauge("tuneloop_controller_pending_feedback", "Feedback waiting for its prediction to arrive."),
        lag=prom.Gauge("tuneloop_controller_consumer_lag", "Messages not yet consumed.", ["topic", "partition"]),
        drift_value=prom.Gauge(
            "tuneloop_drift_value", "A drift signal's value in the latest window.", ["signal", "model_version"]
        ),
        drift_threshold=prom.Gauge(
            "tuneloop_drift_threshold",
            "The threshold the signal is held against: alpha for tests (compare the p-value), else the value's limit.",
            ["signal", "model_version"],
        ),
        drift_p_value=prom.Gauge(
            "tuneloop_drift_p_value", "A test signal's p-value, adjusted for the window's tests.", ["signal", "model_version"]
        ),
        drift_detected=prom.Gauge(
            "tuneloop_drift_detected", "1 when the signal drifted in the latest window.", ["signal", "model_version"]
        ),
        windows=prom.Counter(
            "tuneloop_drift_windows_total", "Drift windows evaluated, by whether any signal drifted.",
            ["model_version", "drifted"],
        ),
        window_seconds=prom.Histogram(
            "tuneloop_drift_window_evaluation_seconds", "Time to compute one window's signals.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        ),
        feedback_recall=prom.Gauge(
            "tuneloop_feedback_recall", "Recall per true label over the latest labelled feedback.", ["label", "model_version"]
        ),
        feedback_rows=prom.Gauge(
            "tuneloop_feedback_window_rows", "Labelled feedback rows behind the feedback signals.", ["model_version"]
        ),
        consecutive=prom.Gauge(
            "tuneloop_trigger_consecutive_drift_windows", "Windows in a row with drift, per model version.", ["model_version"]
        ),
        decisions=prom.Counter(
            "tuneloop_trigger_decisions_total", "Trigger decisions by source, outcome and reason.",
            ["source", "outcome", "reason"],
        ),
        runs=prom.Counter("tuneloop_training_runs_total", "Training runs by outcome (started, then how they ended).",
                          ["outcome"]),
        runs_in_progress=prom.Gauge("tuneloop_training_runs_in_progress", "Training runs going now."),
        last_run_started=prom.Gauge("tuneloop_training_last_run_start_time_seconds", "Unix time the last run started."),
        rollout_accuracy=prom.Gauge(
            "tuneloop_rollout_feedback_accuracy",
            "Live feedback accuracy during the current rollout stage, for the candidate and the stable version.", ["role"],
        ),
        rollout_rows=prom.Gauge(
            "tuneloop_rollout_feedback_rows", "Labelled rows behind tuneloop_rollout_feedback_accuracy.", ["role"]
        ),
        rollout_p_worse=prom.Gauge(
            "tuneloop_rollout_p_worse", "p-value of 'the candidate is less accurate than the stable version'."
        ),
        rollout_stage=prom.Gauge(
            "tuneloop_rollout_stage_version", "The candidate's version in each stage (0: none).", ["stage"]
        ),
        rollout_verdicts=prom.Counter(
            "tuneloop_rollout_verdicts_total", "Rollout stages ended, by action and reason.", ["action", "reason"]
        ),
    )


class Controller:
    def __init__(self, settings: Settings, bus: Bus | None = None, metrics: ControllerMetrics | None = None) -> None:
        self.settings = settings
        self.topics = settings.events.topics
        self.bus = bus or open_bus(settings.events)
        self.store = FeedbackStore(settings.controller.store_path)
        self.metrics = metrics or controller_metrics()
        self.fault = os.environ.get(FAULT_ENV, "")
        self.registry = Registry(settings.registry.path)
        self.monitor = WindowMonitor(settings.drift, self._reference, self.store.recent_labelled)
        self.state = ControllerState(settings.controller.store_path)
        self.policy = TriggerPolicy(settings.trigger, started_at=time.time())
        self.launcher = RunLauncher(settings.trigger, self.state)
        self._manual: queue.Queue[tuple[str, Future[tuple[Decision, int | None]]]] = queue.Queue()
        self.metrics.runs_in_progress.set(int(self.launcher.in_progress))
        self._next_judgement = 0.0
        last = self.state.last_run_started()
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

    def run(self, stop: threading.Event) -> None:
        """Consume until stopped; after any failure, reconnect and resume from the last committed offsets."""
        while not stop.is_set():
            consumer = None
            try:
                self.bus.ensure_topics(self.settings.events.topics.model_dump().values())
                consumer = self.bus.consumer(
                    self.settings.controller.group_id, [self.topics.predictions, self.topics.feedback]
                )
                log.info("controller consuming %s and %s", self.topics.predictions, self.topics.feedback)
                while not stop.is_set():
                    self.step(consumer)
            except Exception as exc:  # broker gone, store locked, dead-letter refused: retry from committed offsets
                log.warning("controller step failed (%r); resuming from committed offsets in 2 s", exc)
                stop.wait(2)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close()

    def step(self, consumer: Consumer) -> int:
        records = consumer.poll(self.settings.controller.poll_max_records, timeout_s=0.5)
        predictions, feedback, dead = [], [], []
        for record in records:
            self.metrics.consumed.labels(record.topic).inc()
            try:
                if record.topic == self.topics.predictions:
                    predictions.append(PredictionEvent.model_validate_json(record.value))
                else:
                    feedback.append(FeedbackEvent.model_validate_json(record.value))
            except ValidationError as exc:
                first = exc.errors()[0]
                reason = f"malformed {record.topic} message: {first['msg']} at {list(first['loc']) or 'top level'}"
                dead.append((record, "malformed", reason))
        result = self.store.write(predictions, feedback)
        if self.fault == "exit-after-write" and records:
            os._exit(17)
        self.metrics.stored.inc(result.stored)
        self.metrics.duplicates.inc(result.duplicates)
        for record, kind, reason in dead:
            self._dead_letter(record.topic, record.value.decode("utf-8", errors="replace"), kind, reason)
        self._expire_pending()
        consumer.commit(records)
        self.metrics.pending.set(self.store.count("pending_feedback"))
        for (topic, partition), lag in consumer.lag().items():
            self.metrics.lag.labels(topic, str(partition)).set(lag)
        self._watch(predictions)
        return len(records)

    # -- drift, trigger and runs ---------------------------------------------------------------

    def _watch(self, predictions: list[PredictionEvent]) -> None:
        """After the offsets are committed: windows, decisions, runs. A failure here loses no event."""
        for run in self.launcher.poll():
            self.metrics.runs.labels(run.status).inc()
            log.log(logging.INFO if run.status == "succeeded" else logging.WARNING,
                    "training run %s %s (exit code %s)", run.run_id, run.status, run.exit_code)
        self._judge_rollout()
        started = time.perf_counter()
        # Shadow scores describe a candidate nobody was answered by; the windows watch what was served.
        reports = self.monitor.observe([p for p in predictions if not p.shadow])
        if reports:
            self.metrics.window_seconds.observe((time.perf_counter() - started) / len(reports))
        for report in reports:
            self._export(report)
            self.state.record_window(report)
            version = report.model_version
            state = self._trigger_state()
            decision = self.policy.on_window(version, report.drifted(self.settings.trigger.signals), state)
            self.metrics.consecutive.labels(str(version)).set(self.policy.consecutive(version))
            self._act(decision, state)
        # The state costs a few queries: only while a drift run waits for feedback to pause, or a schedule is on.
        if self.policy.armed or self.settings.trigger.schedule_interval_s:
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
        return TriggerState(
            now=now,
            new_rows=self.store.count_stored_since(iso(last) if last is not None else None),
            last_run_started=last,
            runs_last_day=self.state.runs_since(now - DAY_S),
            run_in_progress=self.launcher.in_progress,
            rollout_in_progress=self.registry.rollout() is not None,
            last_row_stored=datetime.fromisoformat(newest).timestamp() if (newest := self.store.last_stored_at()) else None,
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

    # -- rollout: shadow and canary -----------------------------------------------------------

    JUDGE_INTERVAL_S = 5.0  # a verdict needs new feedback, which arrives far slower than this

    def _judge_rollout(self) -> None:
        now = time.monotonic()
        if now < self._next_judgement:
            return
        self._next_judgement = now + self.JUDGE_INTERVAL_S
        try:
            rollout = self.registry.rollout()
        except (OSError, ValueError) as exc:
            log.warning("cannot read the rollout: %s", exc)
            return
        for stage in ROLLOUT_STAGES:
            self.metrics.rollout_stage.labels(stage).set(rollout.version if rollout and rollout.stage == stage else 0)
        if rollout is None or rollout.stable is None:
            return
        comparison = self._compare(rollout)
        for role, rows, accuracy in (
            ("candidate", comparison.candidate_rows, comparison.candidate_accuracy),
            ("stable", comparison.stable_rows, comparison.stable_accuracy),
        ):
            self.metrics.rollout_rows.labels(role).set(rows)
            self.metrics.rollout_accuracy.labels(role).set(accuracy)
        self.metrics.rollout_p_worse.set(comparison.p_worse)
        elapsed = time.time() - datetime.fromisoformat(rollout.stage_started_at).timestamp()
        verdict = judge(self.settings.rollout, rollout.stage, elapsed, comparison)
        if verdict.action != "wait":
            self._conclude(rollout, verdict)

    def _compare(self, rollout: Rollout) -> Comparison:
        since = rollout.stage_started_at
        if rollout.stage == "shadow":
            return compare_paired(self.store.shadow_pairs(rollout.version, since))
        assert rollout.stable is not None
        return compare_unpaired(
            self.store.labelled_since(rollout.version, since), self.store.labelled_since(rollout.stable, since)
        )

    def _conclude(self, rollout: Rollout, verdict: Verdict) -> None:
        config = self.settings.rollout
        reason = f"{verdict.reason}: {verdict.detail}"
        try:
            if verdict.action == "advance":
                stage = config.stages[config.stages.index(rollout.stage) + 1]
                self.registry.start_rollout(rollout.version, stage, config.canary_share, reason)
                action = stage
            else:
                self.registry.end_rollout(verdict.action == "promote", reason)
                action = "promote" if verdict.action == "promote" else "abort"
        except RegistryError as exc:  # someone else ended or changed it meanwhile
            log.warning("rollout of v%s not %sd: %s", rollout.version, verdict.action, exc)
            return
        self.metrics.rollout_verdicts.labels(verdict.action, verdict.reason).inc()
        log.warning("rollout v%s %s -> %s: %s", rollout.version, rollout.stage, action, reason)
        self._announce(ModelEvent(action=action, version=rollout.version, previous=rollout.stable, reason=reason))

    def _announce(self, event: ModelEvent) -> None:
        try:
            announce(self.bus, self.topics.model, event)
        except Exception as exc:  # the replicas' registry watch finds the change anyway
            log.warning("model event not published (%s)", exc)

    def rollback(self, to: int | None, reason: str) -> tuple[int | None, int]:
        """Serve an earlier version again (admin endpoint); the replicas swap to it."""
        current, target = self.registry.rollback(to, reason)
        if target != current:
            self._announce(ModelEvent(action="rollback", version=target, previous=current, reason=reason))
        return current, target

    def request_manual(self, reason: str, timeout_s: float = 30.0) -> tuple[Decision, int | None]:
        """From another thread: ask the loop for a run; returns its decision and the run id if one started."""
        answer: Future[tuple[Decision, int | None]] = Future()
        self._manual.put((reason, answer))
        try:
            return answer.result(timeout=timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"the controller loop did not answer within {timeout_s:g} s; is the event bus up?") from None

    def status(self) -> ControllerStatus:
        runs = self.state.runs()
        return ControllerStatus(
            running_runs=[r for r in runs if r["status"] == "running"],
            recent_runs=runs[-20:],
            recent_decisions=self.state.decisions(last=50),
            consecutive_drift_windows=self.policy.consecutive_by_version(),
            stable_version=self.registry.current_version(),
            rollout=self.registry.rollout(),
        )

    def _expire_pending(self) -> None:
        expired = self.store.expired_pending(self.settings.controller.join_timeout_s)
        for _, payload in expired:
            reason = f"its prediction did not arrive within {self.settings.controller.join_timeout_s:g} s"
            self._dead_letter(self.topics.feedback, payload, "unjoined", reason)
        if expired:
            self.store.drop_pending([feedback_id for feedback_id, _ in expired])

    def _dead_letter(self, topic: str, raw: str, kind: str, reason: str) -> None:
        letter = DeadLetter(topic=topic, reason=reason, raw=raw)
        acknowledged = self.bus.publish_many(self.topics.dead_letter, [(None, letter.model_dump_json().encode())])
        if not all(acknowledged):
            # Not committing keeps the message for a retry rather than losing it.
            raise RuntimeError(f"dead-letter topic {self.topics.dead_letter} did not acknowledge")
        self.metrics.dead_lettered.labels(kind).inc()
        log.warning("dead-lettered a %s message: %s", topic, reason)


def serve_controller(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the controller with its HTTP side (/metrics, /admin) until stopped."""
    import uvicorn

    controller = Controller(settings)
    app = admin_app(controller, settings.controller.admin_token.get_secret_value())
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.controller.host, port=settings.controller.port, log_level="warning")
    )
    threading.Thread(target=server.run, name="controller-http", daemon=True).start()
    controller.run(stop or threading.Event())
