"""Sliding windows of prediction events, each compared with its model version's reference.

Every `window_step` events of a version, the last `window_size` of them are tested against the
reference captured when that version was published: confidence, class mix, embedding sketch,
input length, unknown-token rate and abstention rate, plus the quality of the latest labelled feedback. The
tests' p-values are adjusted together (Benjamini-Yekutieli), since one window runs several.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from monitoring.drift import (
    Signal, abstention_signal, class_mix_signals, confidence_signals, embedding_signal, fdr_adjusted, feedback_quality,
    js_distance, length_signal, psi, unknown_token_signal,
)
from tuneloop.config import DriftConfig
from tuneloop.events import PredictionEvent
from tuneloop.reference import Reference

log = logging.getLogger("tuneloop.drift")

# (true label, predicted label) of the latest labelled feedback served by one version.
FeedbackPairs = list[tuple[str, str]]


@dataclass(frozen=True)
class WindowReport:
    model_version: int
    events_seen: int  # events of this version consumed when the window closed
    signals: list[Signal]
    recall: dict[str, float] = field(default_factory=dict)
    feedback_rows: int = 0

    def drifted(self, names: list[str] | None = None) -> list[str]:
        """Names of the drifted signals, among `names` when given."""
        return [s.name for s in self.signals if s.drifted and (names is None or s.name in names)]


@dataclass
class _VersionWindow:
    reference: Reference
    events: deque[PredictionEvent]
    seen: int = 0
    since_evaluation: int = 0

    # The PSI and JS conventions assume large samples. A window of a few hundred events and a
    # reference of a few hundred rows differ by chance by more than that (more so with many
    # labels), so each threshold is at least its noise floor here: the 99th percentile of the
    # statistic between two resamples of the reference, one of its size and one of the window's.

    def _noise_floor(self, statistic: Callable[[np.ndarray, np.ndarray], float], values: np.ndarray) -> float:
        rng = np.random.default_rng(0)
        size = self.events.maxlen or 1
        draws = [statistic(rng.choice(values, len(values)), rng.choice(values, size)) for _ in range(200)]
        return float(np.quantile(draws, 0.99))

    @cached_property
    def psi_noise_floor(self) -> float:
        return self._noise_floor(psi, self.reference.confidence)

    @cached_property
    def js_noise_floor(self) -> float:
        n_labels = len(self.reference.labels)

        def distance(a: np.ndarray, b: np.ndarray) -> float:
            return js_distance(np.bincount(a, minlength=n_labels) + 1e-6, np.bincount(b, minlength=n_labels) + 1e-6)

        return self._noise_floor(distance, self.reference.predicted)


def below_by_chance(limit: float, rows: int, z: float = 1.645) -> float:
    """The limit lowered by its one-sided 95 % sampling error over `rows` labelled rows.

    A window of 200 rows scatters about 2.5 points around the true accuracy, so a plain limit is
    crossed by chance whenever the true value sits near it (measured: imdb traffic at 0.89 against
    a limit of 0.864 flagged 3 of 37 windows). Only a shortfall beyond the sampling error is drift.
    """
    p = min(max(limit, 0.0), 1.0)
    return limit - z * math.sqrt(p * (1 - p) / rows)


class WindowMonitor:
    def __init__(
        self,
        config: DriftConfig,
        load_reference: Callable[[int], Reference | None],
        recent_feedback: Callable[[int, int], FeedbackPairs],
    ) -> None:
        self.config = config
        self._load_reference = load_reference
        self._recent_feedback = recent_feedback
        self._windows: dict[int, _VersionWindow | None] = {}

    def observe(self, events: list[PredictionEvent]) -> list[WindowReport]:
        """Add consumed events; return a report for every window that closed."""
        reports = []
        for event in events:
            window = self._window(event.model_version)
            if window is None:
                continue
            window.events.append(event)
            window.seen += 1
            window.since_evaluation += 1
            if len(window.events) == window.events.maxlen and window.since_evaluation >= self.config.window_step:
                window.since_evaluation = 0
                reports.append(self.evaluate(event.model_version))
        return reports

    def _window(self, version: int) -> _VersionWindow | None:
        if version not in self._windows:
            reference = self._load_reference(version)
            if reference is None:
                log.warning("model v%s has no drift reference; its traffic is not monitored", version)
            self._windows[version] = (
                _VersionWindow(reference, deque(maxlen=self.config.window_size)) if reference is not None else None
            )
        return self._windows[version]

    def evaluate(self, version: int) -> WindowReport:
        window = self._windows[version]
        assert window is not None
        reference, events, config = window.reference, list(window.events), self.config
        labels = reference.labels
        confidence = np.array([max(e.scores.values()) for e in events])
        psi_threshold = max(config.psi_threshold, window.psi_noise_floor)
        signals = confidence_signals(reference.confidence, confidence, config.alpha, psi_threshold)
        js_threshold = max(config.class_mix_js_threshold, window.js_noise_floor)
        signals += class_mix_signals(reference.predicted_labels, [e.label for e in events], labels, config.alpha, js_threshold)
        sketches = [e.sketch for e in events if e.sketch]
        if len(sketches) == len(events) and reference.sketch.shape[1] == len(sketches[0]):
            signals.append(
                embedding_signal(reference.sketch, np.array(sketches), config.alpha, resamples=config.mmd_permutations)
            )
        tokens = [e.tokens for e in events if e.tokens is not None]
        if tokens:
            signals.append(length_signal(reference.tokens, np.array(tokens), config.alpha))
            unknown = sum(e.unknown_tokens or 0 for e in events)
            signals.append(unknown_token_signal(reference.unknown_rate, unknown / sum(tokens), config.unknown_rate_increase))
        if reference.abstain_below is not None:
            signals.append(abstention_signal(reference.confidence, confidence, reference.abstain_below, config.alpha))
        recall, rows = {}, 0
        pairs = self._recent_feedback(version, config.feedback_rows)
        if len(pairs) >= config.feedback_min_rows:
            baseline = feedback_quality(reference.true_labels, reference.predicted_labels, labels)
            quality = feedback_quality([t for t, _ in pairs], [p for _, p in pairs], labels)
            n = len(pairs)
            signals += [
                Signal("feedback_accuracy", quality.accuracy,
                       below_by_chance(baseline.accuracy - config.max_accuracy_drop, n), lower_is_drift=True),
                Signal("feedback_macro_f1", quality.macro_f1,
                       below_by_chance(baseline.macro_f1 - config.max_macro_f1_drop, n), lower_is_drift=True),
            ]
            recall, rows = quality.recall, quality.rows
        return WindowReport(version, window.seen, fdr_adjusted(signals), recall, rows)
