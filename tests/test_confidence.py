"""tuneloop/confidence.py: the softmax with a temperature, and expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.confidence import expected_calibration_error, softmax


def test_softmax_rows_sum_to_one_and_are_stable_for_large_logits() -> None:
    probabilities = softmax(np.array([[1000.0, 0.0], [1.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probabilities[1], [0.5, 0.5])
    assert probabilities[0, 0] == pytest.approx(1.0)


def test_a_temperature_keeps_the_ranking_and_moves_the_scores() -> None:
    logits = np.random.default_rng(0).normal(size=(50, 7)) * 3
    plain, cooled, warmed = softmax(logits), softmax(logits, 0.5), softmax(logits, 4.0)
    assert (plain.argmax(1) == cooled.argmax(1)).all() and (plain.argmax(1) == warmed.argmax(1)).all()
    assert (cooled.max(1) >= plain.max(1)).all() and (warmed.max(1) <= plain.max(1)).all()
    np.testing.assert_allclose(softmax(logits, 2.0), softmax(logits / 2.0))


def test_expected_calibration_error_by_hand() -> None:
    # Two bins hold rows: top scores 0.95 (4 rows, 3 right: |0.75 - 0.95| = 0.2) and 0.55 (4 rows, 2 right:
    # |0.5 - 0.55| = 0.05); weighted by rows, (4 * 0.2 + 4 * 0.05) / 8 = 0.125.
    probabilities = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    truth = np.array([0, 0, 0, 1, 0, 0, 1, 1])
    assert expected_calibration_error(probabilities, truth) == pytest.approx(0.125)
    # Scores that say what they mean: right as often as they claim, in every bin
    assert expected_calibration_error(np.array([[0.75, 0.25]] * 4), np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    # A top score of exactly 1 counts, in the last bin
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one row"):
        expected_calibration_error(np.zeros((0, 2)), np.array([], dtype=int))
