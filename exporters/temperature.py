"""A version's temperature, fitted at export on rows training never saw (`tuneloop/confidence.py` applies it).

Not to be confused with `calibrated_int8.py`, whose calibration measures activation ranges for quantization."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from tuneloop.confidence import ECE_BINS, expected_calibration_error, softmax

MIN_ROWS = 20  # fewer held-out rows than this fit nothing: the version keeps temperature 1
BOUNDS = (0.05, 20.0)  # temperatures searched; a fit near a bound says the rows were too few or too easy


def log_loss(logits: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    scaled = logits.astype(np.float64) / temperature
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(truth)), truth]))


def fit_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature of least log-loss (convex in 1 / T, so a bounded scalar search finds it)."""
    low, high = (math.log(bound) for bound in BOUNDS)
    found = minimize_scalar(lambda log_t: log_loss(logits, truth, math.exp(log_t)), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def abstain_threshold(probabilities: np.ndarray, truth: np.ndarray, accuracy_cost: float) -> float | None:
    """The highest top score below which abstaining keeps in-scope accuracy (an abstention counted as a miss)
    within `accuracy_cost` of answering everything; None when not even the least confident row can be spared, or
    when every row could be (a model wrong on all of them)."""
    if not len(truth):
        return None
    confidence = probabilities.max(axis=1)
    order = np.argsort(confidence, kind="stable")
    right = (probabilities.argmax(axis=1) == truth)[order]
    # Abstaining on the k least confident rows loses the right answers among them.
    lost = np.concatenate([[0], np.cumsum(right)])
    spared = int(np.flatnonzero(lost <= accuracy_cost * len(truth))[-1])  # rows that may go unanswered
    if spared in (0, len(truth)):  # none, or all: a threshold above every score would answer nothing
        return None
    return float(confidence[order][spared])  # that row and those above it are answered


def answered_accuracy(probabilities: np.ndarray, truth: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """(in-scope accuracy with abstentions as misses, share abstained) at a threshold."""
    answered = probabilities.max(axis=1) >= (threshold or 0.0)
    right = (probabilities.argmax(axis=1) == truth) & answered
    return float(right.mean()), float(1 - answered.mean())


def fit_and_check(logits: np.ndarray, truth: np.ndarray, seed: int = 0, accuracy_cost: float = 0.02,
                  out_of_scope: int | None = None) -> dict[str, Any]:
    """Fit the temperature and choose the abstain threshold on a random half of the rows; measure ECE before and
    after, and what the threshold costs, on the other half: the figures describe the stored temperature and
    threshold on rows they were not chosen on. `truth` holds label indices; rows of the `out_of_scope` label (an
    abstention is their right answer) take part in the fit, not in the threshold or the in-scope accuracy."""
    if len(truth) < MIN_ROWS:
        return {"temperature": 1.0, "abstain_below": None, "fitted_rows": 0, "checked_rows": 0, "bins": ECE_BINS,
                "note": f"{len(truth)} held-out rows, fewer than {MIN_ROWS}: temperature and threshold not fitted"}
    order = np.random.default_rng(seed).permutation(len(truth))
    fitted, checked = order[: len(order) // 2], order[len(order) // 2 :]
    temperature, note = fit_temperature(logits[fitted], truth[fitted]), None
    if not BOUNDS[0] * 2 < temperature < BOUNDS[1] / 2:  # a flat log-loss stops the search short of the bound itself
        note = f"the fit ran to the search bound ({temperature:.3g}): too few or too easy rows; temperature kept at 1"
        temperature = 1.0
    in_fitted, in_checked = (rows[truth[rows] != out_of_scope] for rows in (fitted, checked))
    threshold = abstain_threshold(softmax(logits[in_fitted], temperature), truth[in_fitted], accuracy_cost)
    served = softmax(logits[in_checked], temperature)  # the checked in-scope rows as the version will score them
    accuracy, _ = answered_accuracy(served, truth[in_checked], None)
    accuracy_abstaining, abstained = answered_accuracy(served, truth[in_checked], threshold)
    ece_after = expected_calibration_error(softmax(logits[checked], temperature), truth[checked])
    return ({"note": note} if note else {}) | {
        "temperature": round(temperature, 4),
        "fitted_rows": len(fitted),
        "checked_rows": len(checked),
        "bins": ECE_BINS,
        "ece_before": round(expected_calibration_error(softmax(logits[checked]), truth[checked]), 4),
        "ece_after": round(ece_after, 4),
        "log_loss_before": round(log_loss(logits[checked], truth[checked], 1.0), 4),
        "log_loss_after": round(log_loss(logits[checked], truth[checked], temperature), 4),
        "abstain_below": None if threshold is None else round(threshold, 6),
        "abstain_accuracy_cost": accuracy_cost,
        "checked_accuracy": round(accuracy, 4),  # answering every checked row
        "checked_accuracy_abstaining": round(accuracy_abstaining, 4),  # abstentions counted as misses
        "checked_abstained": round(abstained, 4),
    }
