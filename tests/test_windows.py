"""Sliding drift windows (monitoring/windows.py), on synthetic events of known shape and on a replay through a real
model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitoring.drift import Signal
from monitoring.windows import WindowMonitor, below_by_chance
from tests.support.data import clinc_unseen
from trainer import scenario
from tuneloop.config import DriftConfig
from tuneloop.events import PredictionEvent
from tuneloop.inference import OnnxTextClassifier
from tuneloop.reference import REFERENCE_FILE, Reference
from tuneloop.registry import Registry

LABELS = ["a", "b"]
CONFIG = DriftConfig(window_size=100, window_step=25, feedback_min_rows=20)


def reference(rng: np.random.Generator, n: int = 300) -> Reference:
    predicted = rng.integers(0, 2, n)
    return Reference(
        labels=LABELS, confidence=rng.uniform(0.8, 1.0, n), predicted=predicted, truth=predicted.copy(),
        sketch=rng.normal(size=(n, 8)), tokens=rng.integers(10, 30, n), unknown_tokens=np.zeros(n, dtype=int),
    )


def events(rng: np.random.Generator, n: int, version: int = 1, shift: float = 0.0, length: int = 10) -> list[PredictionEvent]:
    out = []
    for i in range(n):
        label = LABELS[int(rng.integers(0, 2))]
        top = float(rng.uniform(0.8, 1.0))
        out.append(PredictionEvent(
            request_id=f"r{i}", text="t", label=label, scores={label: top, "b" if label == "a" else "a": 1 - top},
            model_version=version, sketch=list(rng.normal(shift, 1, 8)), tokens=int(rng.integers(length, length + 20)),
            unknown_tokens=0,
        ))
    return out


def test_windows_close_every_step_once_full_and_flag_a_shift() -> None:
    rng = np.random.default_rng(3)
    monitor = WindowMonitor(CONFIG, lambda version: reference(np.random.default_rng(0)), lambda version, n: [])
    steady = monitor.observe(events(rng, 200))
    assert [r.events_seen for r in steady] == [100, 125, 150, 175, 200]
    assert not any(r.drifted() for r in steady)
    moved = monitor.observe(events(rng, 100, shift=1.0, length=40))
    assert {"embedding_mmd", "input_length_ks"} <= set(moved[-1].drifted())
    assert "confidence_ks" not in moved[-1].drifted()
    assert {s.name for s in moved[-1].signals} == {
        "confidence_psi", "confidence_ks", "class_mix_chi2", "class_mix_js", "embedding_mmd", "input_length_ks",
        "unknown_token_rate",
    }


def test_a_version_without_reference_is_not_monitored_and_feedback_signals_need_enough_rows() -> None:
    rng = np.random.default_rng(4)
    wrong = [("a", "b")] * 30  # every labelled prediction wrong
    monitor = WindowMonitor(
        CONFIG, lambda version: reference(np.random.default_rng(0)) if version == 2 else None,
        lambda version, n: wrong[:n],
    )
    assert monitor.observe(events(rng, 150, version=1)) == []
    report = monitor.observe(events(rng, 100, version=2))[-1]
    accuracy = next(s for s in report.signals if s.name == "feedback_accuracy")
    # The limit (reference 1.0 minus the 0.1 allowed drop) less its sampling error over 30 rows.
    assert accuracy.value == 0.0 and accuracy.threshold == pytest.approx(0.9 - 1.645 * (0.9 * 0.1 / 30) ** 0.5)
    assert accuracy.drifted
    assert report.feedback_rows == 30 and report.recall == {"a": 0.0}
    sparse = WindowMonitor(CONFIG, lambda version: reference(np.random.default_rng(0)), lambda version, n: wrong[:10])
    assert "feedback_accuracy" not in {s.name for s in sparse.observe(events(rng, 100))[-1].signals}


def test_feedback_quality_drifts_only_beyond_its_sampling_error() -> None:
    limit = 0.864  # measured case: reference accuracy 0.964, allowed drop 0.1
    threshold = below_by_chance(limit, 200)
    assert 0.82 < threshold < 0.83
    assert not Signal("feedback_accuracy", 0.86, threshold, lower_is_drift=True).drifted  # chance, 200 rows
    assert Signal("feedback_accuracy", 0.80, threshold, lower_is_drift=True).drifted
    assert below_by_chance(limit, 2000) > threshold  # more rows, tighter


def test_the_abstention_rate_fires_when_out_of_scope_traffic_rises_in_a_replay(clinc_registry: Path) -> None:
    """A replay through the real v1 of CLINC150: in-scope texts alone, then with 30 % out-of-scope queries.

    The in-scope texts are train-split rows v1 never saw, the reference's own distribution. CLINC's test split is a
    small real shift from it (v1 abstains on 6.7-7.9 % of old-domain test texts against 3.7-5.2 % of its reference
    and 4.4-5.1 % of unseen train rows, fp32 and bf16 v1s), which a window of 200 may rightly flag."""
    manifest, directory = Registry(clinc_registry).resolve()
    reference = Reference.load(directory / REFERENCE_FILE, manifest.labels)
    assert reference.abstain_below == manifest.abstain_below is not None
    classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
    in_scope = clinc_unseen().texts  # 3,150 texts v1 never saw
    out_of_scope = scenario.out_of_scope("test", None, seed=5).texts
    mixed = in_scope[600:880] + out_of_scope[:120]  # 30 % out of scope
    mixed = [mixed[i] for i in np.random.default_rng(5).permutation(len(mixed))]

    def replayed(texts: list[str]) -> list[PredictionEvent]:
        scores = classifier.predict(texts)
        return [PredictionEvent(request_id=f"r{i}", text=text, label=manifest.labels[int(row.argmax())],
                                scores=dict(zip(manifest.labels, map(float, row), strict=True)), model_version=1)
                for i, (text, row) in enumerate(zip(texts, scores.probabilities, strict=True))]

    config = DriftConfig(window_size=200, window_step=50)
    monitor = WindowMonitor(config, lambda version: reference, lambda version, n: [])
    quiet = monitor.observe(replayed(in_scope[:600]))
    assert len(quiet) == 9
    assert not any("abstention_rate" in report.drifted() for report in quiet)
    risen = monitor.observe(replayed(mixed))
    assert "abstention_rate" in risen[-1].drifted(), [s for s in risen[-1].signals if s.name == "abstention_rate"]
