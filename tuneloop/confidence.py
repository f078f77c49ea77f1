"""Confidence that means what it says: a version's scores divided by one temperature before the softmax.

A fine-tuned classifier's softmax is rarely calibrated: a top score of 0.9 may be right 70 % of the time, or 99 %.
One temperature T, fitted at export on rows training never saw (`exporters/temperature.py`), rescales every
row's logits alike (Guo et al., 2017): the ranking of labels, and so every prediction, stays as it was, and the
scores come closer to the accuracy they promise. Expected calibration error (ECE) measures the distance.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`, stable for large logits."""
    scaled = logits / temperature
    shifted = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width bins of the top score, weighted by the rows in each bin.

    `truth` holds each row's label index."""
    if len(truth) == 0:
        raise ValueError("expected calibration error needs at least one row")
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == truth
    # A top score of exactly 1.0 belongs to the last bin; bins are (lower, upper] as in Guo et al.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.sum() * abs(right[members].mean() - confidence[members].mean())
    return float(error / len(truth))
