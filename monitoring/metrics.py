"""The controller's Prometheus metrics, all named ``tuneloop_*``, grouped by the part that sets them.

The controller registers them in prometheus_client's process-wide registry, which its `/metrics`
serves. A test that builds several controllers in one process gives each its own
`CollectorRegistry`, since a metric name can be registered only once per registry.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

WINDOW_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Factory:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry)

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, documentation, buckets=buckets, registry=self.registry)


class IngestMetrics:
    """Events consumed, stored, deduplicated and dead-lettered; feedback waiting; consumer lag."""

    def __init__(self, make: _Factory) -> None:
        self.consumed = make.counter("tuneloop_controller_consumed_total", "Messages consumed, by topic.", ["topic"])
        self.stored = make.counter("tuneloop_controller_feedback_stored_total", "Feedback rows written to the store.")
        self.duplicates = make.counter(
            "tuneloop_controller_duplicates_skipped_total", "Redelivered or resent feedback that was already stored."
        )
        self.dead_lettered = make.counter(
            "tuneloop_controller_dead_lettered_total", "Messages sent to the dead-letter topic, by reason.", ["reason"]
        )
        self.pending = make.gauge("tuneloop_controller_pending_feedback", "Feedback waiting for its prediction to arrive.")
        self.lag = make.gauge("tuneloop_controller_consumer_lag", "Messages not yet consumed.", ["topic", "partition"])


class DriftMetrics:
    """Each closed window's signals and feedback recall, the trigger's decisions, and the training runs."""

    def __init__(self, make: _Factory) -> None:
        self.drift_value = make.gauge(
            "tuneloop_drift_value", "A drift signal's value in the latest window.", ["signal", "model_version"]
        )
        self.drift_threshold = make.gauge(
            "tuneloop_drift_threshold",
            "The threshold the signal is held against: alpha for tests (compare the p-value), else the value's limit.",
            ["signal", "model_version"],
        )
        self.drift_p_value = make.gauge(
            "tuneloop_drift_p_value", "A test signal's p-value, adjusted for the window's tests.", ["signal", "model_version"]
        )
        self.drift_detected = make.gauge(
            "tuneloop_drift_detected", "1 when the signal drifted in the latest window.", ["signal", "model_version"]
        )
        self.windows = make.counter(
            "tuneloop_drift_windows_total", "Drift windows evaluated, by whether any signal drifted.",
            ["model_version", "drifted"],
        )
        self.window_seconds = make.histogram(
            "tuneloop_drift_window_evaluation_seconds", "Time to compute one window's signals.", WINDOW_SECONDS_BUCKETS
        )
        self.feedback_recall = make.gauge(
            "tuneloop_feedback_recall", "Recall per true label over the latest labelled feedback.", ["label", "model_version"]
        )
        self.feedback_rows = make.gauge(
            "tuneloop_feedback_window_rows", "Labelled feedback rows behind the feedback signals.", ["model_version"]
        )
        self.consecutive = make.gauge(
            "tuneloop_trigger_consecutive_drift_windows", "Windows in a row with drift, per model version.", ["model_version"]
        )
        self.decisions = make.counter(
            "tuneloop_trigger_decisions_total", "Trigger decisions by source, outcome and reason.",
            ["source", "outcome", "reason"],
        )
        self.runs = make.counter(
            "tuneloop_training_runs_total", "Training runs by outcome (started: requested; then how they ended).", ["outcome"]
        )
        self.runs_in_progress = make.gauge("tuneloop_training_runs_in_progress", "Training runs requested or running (1 while any is).")
        self.last_run_started = make.gauge(
            "tuneloop_training_last_run_start_time_seconds", "Unix time the last run started."
        )


class RolloutMetrics:
    """A candidate in shadow or canary: its stage, live accuracy against the live version, verdicts."""

    def __init__(self, make: _Factory) -> None:
        self.accuracy = make.gauge(
            "tuneloop_rollout_feedback_accuracy",
            "Live feedback accuracy during the current rollout stage, for the candidate and the live version.", ["role"],
        )
        self.rows = make.gauge(
            "tuneloop_rollout_feedback_rows", "Labelled rows behind tuneloop_rollout_feedback_accuracy.", ["role"]
        )
        self.p_worse = make.gauge(
            "tuneloop_rollout_p_worse", "p-value of 'the candidate is less accurate than the live version'."
        )
        self.stage = make.gauge(
            "tuneloop_rollout_stage_version", "The candidate's version in each stage (0: none).", ["stage"]
        )
        self.verdicts = make.counter(
            "tuneloop_rollout_verdicts_total", "Rollout stages ended, by action and reason.", ["action", "reason"]
        )


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        make = _Factory(registry)
        self.ingest = IngestMetrics(make)
        self.drift = DriftMetrics(make)
        self.rollout = RolloutMetrics(make)
        self.leader = make.gauge(
            "tuneloop_controller_leader", "1 while this controller leads (holds the store's lock), 0 while it waits."
        )


@functools.cache
def controller_metrics() -> ControllerMetrics:
    """The controller's metrics in the process-wide registry, registered once per process."""
    return ControllerMetrics()
