"""Drift statistics on synthetic shifts of known size and on the real imdb -> amazon shift."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from monitoring.drift import (
    abstention_signal,
    Signal, class_mix_signals, confidence_signals, embedding_signal, fdr_adjusted, feedback_quality, length_signal, psi,
    unknown_token_signal,
)
from tests.support.data import AMAZON, IMDB


@pytest.fixture
def rng() -> np.random.Generator:
    """Seeded per test, so each test sees the same draws whatever runs before it."""
    return np.random.default_rng(7)


def test_psi_is_near_zero_for_one_distribution_and_large_for_a_shift(rng: np.random.Generator) -> None:
    reference = rng.beta(8, 2, 2000)
    assert psi(reference, rng.beta(8, 2, 2000)) < 0.05
    assert psi(reference, rng.beta(3, 3, 2000)) > 0.25


def test_psi_on_a_small_reference_rarely_flags_traffic_from_its_own_distribution() -> None:
    """A v1's reference is its validation and holdout rows: 140 for imdb. With 10 bins, 14 rows a bin, the
    reference's own sampling error is frozen into every window, and an unlucky one flagged 28 % of the windows
    of traffic from its very distribution (12 % for the real imdb v1 of benchmarks/drift.py)."""
    worst = 0.0
    for seed in range(12):
        draw = np.random.default_rng(seed)
        reference = 0.5 + 0.5 * draw.beta(6, 0.6, 140)  # top-class confidences of a confident binary model
        windows = [0.5 + 0.5 * draw.beta(6, 0.6, 200) for _ in range(300)]
        flagged = [confidence_signals(reference, window, alpha=0.05)[0].drifted for window in windows]
        worst = max(worst, float(np.mean(flagged)))
    assert worst <= 0.01, worst
    shifted = confidence_signals(reference, 0.5 + 0.5 * draw.beta(3, 1, 200), alpha=0.05)[0]
    assert shifted.drifted, shifted  # still sees a real drop of confidence


def test_confidence_signals_fire_on_a_confidence_drop_only(rng: np.random.Generator) -> None:
    reference = rng.beta(9, 1, 1000)
    same = confidence_signals(reference, rng.beta(9, 1, 500), alpha=0.05)
    dropped = confidence_signals(reference, rng.beta(4, 2, 500), alpha=0.05)
    assert not any(s.drifted for s in same)
    assert all(s.drifted for s in dropped)


def test_class_mix_detects_a_new_majority_class_and_ignores_unseen_labels(rng: np.random.Generator) -> None:
    labels = ["a", "b", "c"]
    reference = ["a"] * 500 + ["b"] * 500
    steady = class_mix_signals(reference, ["a"] * 250 + ["b"] * 250, labels, alpha=0.05)
    shifted = class_mix_signals(reference, ["a"] * 100 + ["b"] * 100 + ["c"] * 300, labels, alpha=0.05)
    assert not any(s.drifted for s in steady)
    assert all(s.drifted for s in shifted)
    assert steady[0].p_value == pytest.approx(1.0)


def test_embedding_mmd_needs_a_real_shift_to_fire(rng: np.random.Generator) -> None:
    reference = rng.normal(size=(150, 8))
    same = embedding_signal(reference, rng.normal(size=(150, 8)), alpha=0.05)
    moved = embedding_signal(reference, rng.normal(0.5, 1, size=(150, 8)), alpha=0.05)
    assert not same.drifted and same.p_value > 0.05
    assert moved.drifted and moved.p_value < 0.01


def test_length_signal_on_real_text_imdb_against_amazon() -> None:
    def lengths(path) -> np.ndarray:
        with path.open() as handle:
            return np.array([len(row["text"].split()) for row in csv.DictReader(handle)])

    imdb, amazon = lengths(IMDB), lengths(AMAZON)
    halves = length_signal(imdb[::2], imdb[1::2], alpha=0.05)
    domains = length_signal(imdb, amazon, alpha=0.05)
    assert not halves.drifted
    assert domains.drifted, domains


def test_unknown_token_rate_is_a_rise_over_the_reference() -> None:
    assert not unknown_token_signal(0.001, 0.005).drifted
    assert unknown_token_signal(0.001, 0.05).drifted


def test_abstention_rate_flags_a_rise_of_low_scores_beyond_chance() -> None:
    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 1, 400)  # 20 % below 0.2
    steady = abstention_signal(reference, rng.uniform(0, 1, 200), threshold=0.2, alpha=0.05)
    assert not steady.drifted and steady.value == pytest.approx(0.2, abs=0.07)
    risen = abstention_signal(reference, np.concatenate([rng.uniform(0, 1, 140), rng.uniform(0, 0.2, 60)]),
                              threshold=0.2, alpha=0.05)
    assert risen.drifted and risen.value > 0.35, risen
    fewer = abstention_signal(reference, rng.uniform(0.2, 1, 200), threshold=0.2, alpha=0.05)
    assert not fewer.drifted  # fewer low scores than the reference is no alarm


def test_fdr_adjustment_raises_p_values_and_keeps_threshold_signals() -> None:
    signals = [Signal("t1", 0.3, 0.05, 0.04), Signal("t2", 0.2, 0.05, 0.03), Signal("psi", 0.3, 0.25)]
    adjusted = fdr_adjusted(signals)
    assert adjusted[2] == signals[2]
    assert all(a.p_value >= s.p_value for a, s in zip(adjusted[:2], signals[:2], strict=True))
    assert not adjusted[0].drifted  # 0.04 alone would have fired


def test_feedback_quality_counts() -> None:
    quality = feedback_quality(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"], ["a", "b", "c", "d"])
    assert quality.rows == 5
    assert quality.accuracy == pytest.approx(3 / 5)
    assert quality.recall == {"a": 0.5, "b": 1.0, "c": 0.0}
    # F1 = 2TP / (actual + predicted): a 2/(2+2), b 4/(2+3), c 0; d, never seen nor predicted, is left out.
    assert quality.macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)
