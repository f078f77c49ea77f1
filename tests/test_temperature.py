"""exporters/temperature.py: the temperature fitted at export, on synthetic logits and on a real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporters.temperature import (MIN_ROWS, abstain_threshold, answered_accuracy, fit_and_check, fit_temperature,
                                   log_loss)
from trainer import scenario
from tuneloop.confidence import expected_calibration_error, softmax
from tuneloop.inference import OnnxTextClassifier
from tuneloop.registry import Registry


def drawn(temperature: float, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(z) and which report z * temperature: the temperature that
    calibrates them is `temperature`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 10)) * 2.5
    truth = np.array([rng.choice(10, p=p) for p in softmax(z)])
    return z * temperature, truth


@pytest.mark.parametrize("temperature", [0.4, 1.0, 3.0])
def test_the_fit_recovers_the_temperature_that_generated_the_labels(temperature: float) -> None:
    logits, truth = drawn(temperature, 4000)
    assert fit_temperature(logits, truth) == pytest.approx(temperature, rel=0.08)


def test_fitted_on_one_half_it_lowers_ece_and_log_loss_on_the_other() -> None:
    logits, truth = drawn(3.0, 2000)  # over-confident, as a fine-tuned head often is
    figures = fit_and_check(logits, truth)
    assert figures["fitted_rows"] + figures["checked_rows"] == 2000
    assert figures["ece_after"] < figures["ece_before"] / 2
    assert figures["log_loss_after"] < figures["log_loss_before"]
    assert log_loss(logits, truth, figures["temperature"]) < log_loss(logits, truth, 1.0)


def test_too_few_rows_keep_the_scores_as_they_are() -> None:
    logits, truth = drawn(3.0, MIN_ROWS - 1)
    figures = fit_and_check(logits, truth)
    assert figures["temperature"] == 1.0 and "not fitted" in figures["note"]


def test_a_published_version_serves_its_fitted_temperature_and_it_lowers_ece(clinc_registry: Path) -> None:
    manifest, directory = Registry(clinc_registry).resolve()
    confidence = manifest.export["confidence"]
    assert confidence["ece_after"] < confidence["ece_before"]  # on its own held-out half
    assert manifest.temperature == confidence["temperature"] != 1.0
    classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
    # CLINC150's test split, which neither training nor the fit saw
    test = scenario.sample(scenario.OLD_DOMAINS, "test", 10, seed=1)
    scores = classifier.predict(test.texts)
    np.testing.assert_allclose(scores.probabilities, softmax(scores.logits, manifest.temperature), rtol=1e-5)
    truth = np.array([manifest.labels.index(label) for label in test.labels])
    assert expected_calibration_error(scores.probabilities, truth) < expected_calibration_error(
        softmax(scores.logits), truth)


def test_the_abstain_threshold_spares_the_least_confident_rows_within_the_accuracy_cost() -> None:
    # Ten rows by rising top score, all predicting label 0; the two least confident are wrong, the rest right.
    top = np.array([0.52, 0.55, 0.58, 0.60, 0.70, 0.80, 0.85, 0.90, 0.95, 0.99])
    probabilities = np.stack([top, 1 - top], axis=1)
    truth = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    # Abstaining on the two wrong rows costs nothing; the third would cost 0.1 of accuracy
    assert abstain_threshold(probabilities, truth, accuracy_cost=0.05) == pytest.approx(0.58)
    assert answered_accuracy(probabilities, truth, 0.58) == (pytest.approx(0.8), pytest.approx(0.2))
    assert abstain_threshold(probabilities, truth, accuracy_cost=0.1) == pytest.approx(0.60)
    # No cost allowed and the least confident row right: nothing can be spared
    assert abstain_threshold(probabilities, 1 - truth, accuracy_cost=0.0) is None


def test_a_model_wrong_on_every_row_gets_no_threshold_rather_than_one_that_answers_nothing() -> None:
    top = np.linspace(0.55, 0.95, 10)
    probabilities = np.stack([top, 1 - top], axis=1)
    assert abstain_threshold(probabilities, np.ones(10, dtype=int), accuracy_cost=0.02) is None


def test_a_fit_that_reaches_the_search_bound_keeps_temperature_one() -> None:
    # Every row right by a wide margin: the log-loss keeps falling as T shrinks, so the search ends at its bound,
    # and scores divided by 0.05 would all be 1.0.
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=60)
    logits = np.zeros((60, 3))
    logits[np.arange(60), truth] = 3.0
    figures = fit_and_check(logits, truth)
    assert figures["temperature"] == 1.0 and "search bound" in figures["note"], figures


def test_rows_of_the_out_of_scope_label_are_fitted_but_never_spare_a_threshold() -> None:
    # In scope (labels 0, 1): 72 right and confident, 8 wrong and unsure. Labelled out of scope (label 2): 40 rows
    # predicted right but with the lowest top scores. Counted as in-scope rows, abstaining on them looked like losing
    # right answers, so no threshold could be afforded at all.
    rng = np.random.default_rng(1)
    truth = np.array([0, 1] * 40 + [2] * 40)
    probabilities = np.full((120, 3), 0.02)
    probabilities[np.arange(80), truth[:80]] = rng.uniform(0.9, 0.96, 80)
    wrong = np.arange(0, 80, 10)
    probabilities[wrong, truth[wrong]] = 0.02
    probabilities[wrong, 1 - truth[wrong]] = rng.uniform(0.5, 0.6, len(wrong))
    probabilities[80:] = [0.3, 0.3, 0.4]
    logits = np.log(probabilities / probabilities.sum(axis=1, keepdims=True))
    assert fit_and_check(logits, truth, accuracy_cost=0.0)["abstain_below"] is None  # as it was
    figures = fit_and_check(logits, truth, accuracy_cost=0.0, out_of_scope=2)
    assert figures["abstain_below"] is not None and figures["checked_abstained"] > 0, figures
    assert figures["checked_rows"] == 60 and figures["temperature"] != 1.0  # all 120 rows fitted and checked
