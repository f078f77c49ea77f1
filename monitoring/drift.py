"""Drift statistics: a window of recent traffic against the reference captured at publish time.

Every test statistic and p-value comes from scipy; what is computed here is only the population
stability index (a formula, not a test) and the counts behind accuracy and recall.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

# The PSI convention: below 0.1 no shift, 0.1-0.25 moderate, above 0.25 significant.
PSI_MODERATE, PSI_SIGNIFICANT = 0.1, 0.25
# Reference rows per PSI bin, at least: the reference's own sampling error is frozen into every window it is
# compared with. A 140-row reference in 10 bins (14 a bin) flagged up to 28 % of windows from its own
# distribution (tests/test_drift.py); at 30 a bin, none. References of 300 rows and more keep 10 bins.
PSI_REFERENCE_ROWS_PER_BIN = 30
_EPS = 1e-6


@dataclass(frozen=True)
class Signal:
    """One statistic of one window. A test drifts when its p-value falls below the threshold (alpha);
    any other signal when its value passes the threshold: above it, or below it for quality signals."""

    name: str
    value: float
    threshold: float
    p_value: float | None = None
    lower_is_drift: bool = False

    @property
    def drifted(self) -> bool:
        if self.p_value is not None:
            return self.p_value < self.threshold
        return self.value < self.threshold if self.lower_is_drift else self.value > self.threshold


def psi(reference: np.ndarray, current: np.ndarray, bins: int | None = None) -> float:
    """Population stability index over the reference's quantile bins: 10, or fewer for a small reference."""
    if bins is None:
        bins = min(10, max(2, len(reference) // PSI_REFERENCE_ROWS_PER_BIN))
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    expected = np.histogram(reference, edges)[0] / len(reference) + _EPS
    actual = np.histogram(current, edges)[0] / len(current) + _EPS
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def confidence_signals(
    reference: np.ndarray, current: np.ndarray, alpha: float, psi_threshold: float = PSI_SIGNIFICANT
) -> list[Signal]:
    """Top-class confidence: PSI against its convention, and a two-sample KS test."""
    ks = stats.ks_2samp(reference, current)
    return [
        Signal("confidence_psi", psi(reference, current), psi_threshold),
        Signal("confidence_ks", float(ks.statistic), alpha, float(ks.pvalue)),
    ]


def class_mix_signals(reference: list[str], current: list[str], labels: list[str], alpha: float,
                      js_threshold: float = 0.1) -> list[Signal]:
    """Predicted-class mix: chi-square test of homogeneity and Jensen-Shannon distance."""
    counts = np.array([[labels_seen.count(label) for label in labels] for labels_seen in (reference, current)])
    present = counts.sum(axis=0) > 0  # a class neither window predicted carries no information
    chi2 = stats.chi2_contingency(counts[:, present]) if present.sum() > 1 else None
    shares = (counts + _EPS) / (counts + _EPS).sum(axis=1, keepdims=True)
    return [
        Signal("class_mix_chi2", float(chi2.statistic) if chi2 else 0.0, alpha, float(chi2.pvalue) if chi2 else 1.0),
        Signal("class_mix_js", js_distance(shares[0], shares[1]), js_threshold),
    ]


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2); identical inputs can round to a tiny negative divergence, read as 0."""
    with np.errstate(invalid="ignore"):
        return float(np.nan_to_num(jensenshannon(p, q, base=2)))


def _rbf_kernel(points: np.ndarray) -> np.ndarray:
    squared = np.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1)
    bandwidth = np.median(squared[squared > 0]) if np.any(squared > 0) else 1.0  # the median heuristic
    return np.exp(-squared / bandwidth)


def embedding_signal(reference: np.ndarray, current: np.ndarray, alpha: float, resamples: int = 200,
                     seed: int = 0) -> Signal:
    """Maximum mean discrepancy (RBF kernel) with a permutation p-value from scipy."""
    kernel = _rbf_kernel(np.vstack([reference, current]))
    n, total = len(reference), len(reference) + len(current)

    def mmd2(rows_a: np.ndarray, rows_b: np.ndarray, axis: int = -1) -> np.ndarray:
        # MMD^2 = w' K w with w = 1/n_a on sample a's rows and -1/n_b on b's; one row of w per resample.
        single = rows_a.ndim == 1
        rows_a, rows_b = np.atleast_2d(rows_a), np.atleast_2d(rows_b)
        weights = np.zeros((len(rows_a), total))
        np.put_along_axis(weights, rows_a, 1.0 / rows_a.shape[1], axis=1)
        np.put_along_axis(weights, rows_b, -1.0 / rows_b.shape[1], axis=1)
        values = np.einsum("rn,nm,rm->r", weights, kernel, weights, optimize=True)
        return values[0] if single else values

    # Multivariate samples: permute row indices, as scipy's permutation_test permutes 1-D samples.
    result = stats.permutation_test(
        (np.arange(n), np.arange(n, total)), mmd2, permutation_type="independent",
        vectorized=True, n_resamples=resamples, alternative="greater", random_state=seed,
    )
    return Signal("embedding_mmd", float(result.statistic), alpha, float(result.pvalue))


def length_signal(reference: np.ndarray, current: np.ndarray, alpha: float) -> Signal:
    ks = stats.ks_2samp(reference, current)
    return Signal("input_length_ks", float(ks.statistic), alpha, float(ks.pvalue))


def unknown_token_signal(reference_rate: float, current_rate: float, max_increase: float = 0.02) -> Signal:
    """Share of tokens the vocabulary maps to [UNK]; the value is the rise over the reference."""
    return Signal("unknown_token_rate", current_rate - reference_rate, max_increase)


def abstention_signal(reference: np.ndarray, current: np.ndarray, threshold: float, alpha: float) -> Signal:
    """Share of texts whose top score is below the version's abstain threshold (out-of-scope texts score low),
    against the reference's share: a one-sided Fisher exact test of the two counts. The value is the window's share."""
    below, below_reference = int((current < threshold).sum()), int((reference < threshold).sum())
    table = [[below, len(current) - below], [below_reference, len(reference) - below_reference]]
    p_value = stats.fisher_exact(table, alternative="greater").pvalue
    return Signal("abstention_rate", below / len(current), alpha, float(p_value))


def fdr_adjusted(signals: list[Signal]) -> list[Signal]:
    """Adjust the tests' p-values for testing several signals every window.

    Benjamini-Yekutieli (scipy's false_discovery_control), which stays valid when the signals are
    dependent, as confidence, class mix and embeddings of one window are.
    """
    tested = [s for s in signals if s.p_value is not None]
    if not tested:
        return signals
    adjusted = iter(stats.false_discovery_control([s.p_value for s in tested], method="by"))
    return [replace(s, p_value=float(next(adjusted))) if s.p_value is not None else s for s in signals]


@dataclass(frozen=True)
class FeedbackQuality:
    rows: int
    accuracy: float
    macro_f1: float
    recall: dict[str, float]


def feedback_quality(true_labels: list[str], predicted: list[str], labels: list[str]) -> FeedbackQuality:
    """Accuracy, macro-F1 (over labels seen in truth or prediction) and per-class recall of labelled feedback."""
    truth, guess = np.array(true_labels), np.array(predicted)
    recall, f1 = {}, []
    for label in labels:
        tp = int(np.sum((truth == label) & (guess == label)))
        actual, claimed = int(np.sum(truth == label)), int(np.sum(guess == label))
        if actual:
            recall[label] = tp / actual
        if actual or claimed:
            f1.append(2 * tp / (actual + claimed))
    accuracy = float(np.mean(truth == guess)) if len(truth) else float("nan")
    return FeedbackQuality(len(truth), accuracy, float(np.mean(f1)) if f1 else float("nan"), recall)
