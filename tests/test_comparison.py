"""Paired comparison of two models on the same rows (tuneloop/comparison.py)."""

from __future__ import annotations

import pytest

from tuneloop.comparison import paired


def test_only_the_rows_where_one_model_alone_is_right_count() -> None:
    # 100 rows: both right on 80, only the reference on 12, only the candidate on 3, neither on 5.
    reference = [True] * 80 + [True] * 12 + [False] * 3 + [False] * 5
    candidate = [True] * 80 + [False] * 12 + [True] * 3 + [False] * 5
    result = paired(reference, candidate)
    assert (result.only_reference, result.only_candidate) == (12, 3)
    assert result.reference_accuracy == pytest.approx(0.92) and result.candidate_accuracy == pytest.approx(0.83)
    assert result.drop == pytest.approx(0.09)
    assert result.p_worse == pytest.approx(0.01758, abs=1e-4)  # P(X >= 12), X ~ Binomial(15, 1/2)
    low, high = result.drop_ci95
    assert low < 0.09 < high and low > 0


def test_worse_needs_both_the_tolerance_and_significance() -> None:
    small = paired([True] * 18 + [False] * 2, [True] * 16 + [False] * 4)  # 10 points worse on 20 rows: 2 discordant
    assert small.drop == pytest.approx(0.1) and small.p_worse == pytest.approx(0.25)
    assert not small.worse_beyond(0.02, 0.05)
    large = paired([True] * 1000, [True] * 990 + [False] * 10)  # 1 point worse, significant
    assert large.p_worse < 0.01
    assert not large.worse_beyond(0.02, 0.05) and large.worse_beyond(0.005, 0.05)


def test_a_better_candidate_is_never_worse() -> None:
    result = paired([False] * 50 + [True] * 50, [True] * 100)
    assert result.drop == pytest.approx(-0.5) and result.p_worse == 1.0
    assert not result.worse_beyond(0.0, 0.05)


def test_rows_must_pair_up() -> None:
    with pytest.raises(ValueError, match="differ in number"):
        paired([True, False], [True])
    assert paired([], []).rows == 0
