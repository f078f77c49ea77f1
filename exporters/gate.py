"""The validation gate: a candidate is promoted only if every check passes, each recorded with its figures.

(a) accuracy on the new data's validation rows is above a floor; (b) it does not trail the live
model on those same rows by more than a tolerance; (c) on the holdout of the original data it
does not fall more than epsilon below the live model (forgetting); (d) int8 agrees with PyTorch
on at least 99 % of argmax decisions; (e) it loads and answers in a fresh ONNX Runtime session,
and its median latency is within a margin of the live model's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import Any

import numpy as np
from scipy import stats

from exporters.quantize import Parity
from trainer.data import LabelledTexts
from tuneloop.config import GateConfig
from tuneloop.inference import OnnxTextClassifier


def accuracy(classifier: OnnxTextClassifier, data: LabelledTexts) -> dict[str, Any]:
    """Accuracy with its 95 % Wilson interval."""
    predicted = classifier.predict(data.texts).probabilities.argmax(axis=1)
    index = {label: i for i, label in enumerate(classifier.labels)}
    correct = int(np.sum(predicted == np.array([index[label] for label in data.labels])))
    interval = stats.binomtest(correct, len(data)).proportion_ci(method="wilson")
    return {"accuracy": correct / len(data), "ci95": [round(interval.low, 4), round(interval.high, 4)], "rows": len(data)}


def median_latencies_s(first: OnnxTextClassifier, second: OnnxTextClassifier, texts: list[str],
                       repeats: int = 3) -> tuple[float, float]:
    """Median single-text latency of two classifiers, timed alternately so that load on the machine hits both alike."""
    timings: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for text in texts:
            for classifier, samples in zip((first, second), timings, strict=True):
                started = time.perf_counter()
                classifier.predict([text])
                samples.append(time.perf_counter() - started)
    return statistics.median(timings[0]), statistics.median(timings[1])


def run_gate(
    candidate: OnnxTextClassifier,
    live: OnnxTextClassifier | None,
    new_val: LabelledTexts,
    holdout: LabelledTexts,
    parity: Parity,
    min_agreement: float,
    config: GateConfig,
) -> dict[str, Any]:
    """Every check's verdict and figures; `passed` only when all pass. Without a live model, (b), (c) and the
    latency comparison have nothing to compare with and pass on the candidate's own figures."""
    checks: dict[str, dict[str, Any]] = {}
    new = accuracy(candidate, new_val)
    checks["new_data_accuracy"] = new | {"floor": config.min_new_accuracy,
                                         "passed": new["accuracy"] >= config.min_new_accuracy}
    live_new = accuracy(live, new_val) if live else None
    checks["no_regression_vs_live"] = {
        "candidate": new["accuracy"], "live": live_new and live_new["accuracy"], "tolerance": config.max_regression,
        "passed": live_new is None or new["accuracy"] >= live_new["accuracy"] - config.max_regression,
    }
    old = accuracy(candidate, holdout)
    live_old = accuracy(live, holdout) if live else None
    checks["forgetting_on_original_holdout"] = {
        "candidate": old, "live": live_old, "max_drop": config.max_forgetting,
        "drop": None if live_old is None else round(live_old["accuracy"] - old["accuracy"], 4),
        "passed": live_old is None or live_old["accuracy"] - old["accuracy"] <= config.max_forgetting,
    }
    checks["int8_parity"] = asdict(parity) | {"min_agreement": min_agreement, "passed": parity.argmax_agreement >= min_agreement}
    probe = holdout.texts[:100]
    if live is None:
        candidate_latency, live_latency = median_latencies_s(candidate, candidate, probe)[0], None
    else:
        candidate_latency, live_latency = median_latencies_s(candidate, live, probe)
    checks["fresh_session_and_latency"] = {
        "candidate_median_ms": round(candidate_latency * 1000, 3),
        "live_median_ms": None if live_latency is None else round(live_latency * 1000, 3),
        "max_increase": config.max_latency_increase,
        "passed": live_latency is None or candidate_latency <= live_latency * (1 + config.max_latency_increase),
    }
    return {"passed": all(check["passed"] for check in checks.values()), "checks": checks}
