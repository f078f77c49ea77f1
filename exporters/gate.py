"""The validation gate: a candidate is promoted only if every check passes, each recorded with its figures.

The candidate and the live model are compared on the very same rows (`tuneloop/comparison.py`): a
check fails only when the candidate is worse by more than its tolerance *and* significantly so,
so a few unlucky rows of a small set cannot reject a good candidate, and a large real loss is
always caught. The rows grow with the data: every version hands its evaluation rows (the original
holdout plus each run's new holdout rows) down to its children.

Forgetting is judged on the lineage's rows (not the new feedback's) of the labels the live model was trained
on, with both models' predictions restricted to those labels. A model that learns new labels must trade some of the
old ones' accuracy for them (an old text may now rightly look like a new class; a retrain from
scratch on all the data pays the same), and the live model can never confuse an old text with a
label it never predicts. What the restriction keeps is the real loss: the encoder and head no
longer telling the old labels apart. A second check bounds what the expansion itself may cost
the known labels (their rows now answered with a new label): a candidate trained on the new rows
alone learns to answer everything with the new labels, which no restriction would show. The
overall check then weighs what users gain against what they lose, on every evaluation row.

Checks: (a) accuracy on the new rows above a floor; (b) not worse than live on those rows;
(c) no forgetting of the labels live was trained on, and (c') a bounded cost of new labels to
them; (d) not worse than live on every evaluation row; (e) int8 agrees with PyTorch on at least 99 % of argmax decisions; (f) it loads and answers in
a fresh ONNX Runtime session, and its median latency is within a margin of the live model's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from exporters.quantize import Parity
from trainer.data import LabelledTexts, concat
from tuneloop.comparison import paired
from tuneloop.config import GateConfig
from tuneloop.inference import OnnxTextClassifier


@dataclass(frozen=True)
class GateRows:
    new_rows: LabelledTexts  # the new feedback's holdout rows (never trained on)
    holdout: LabelledTexts  # evaluation rows handed down the lineage (original holdout + earlier runs' new rows)
    known_labels: list[str]  # the labels the live version was trained on


def accuracy(classifier: OnnxTextClassifier, data: LabelledTexts) -> dict[str, Any]:
    """Accuracy with its 95 % Wilson interval."""
    return wilson(sum(right(classifier.predict(data.texts).probabilities, classifier.labels, data.labels)), len(data))


def wilson(correct: int, rows: int) -> dict[str, Any]:
    interval = stats.binomtest(correct, rows).proportion_ci(method="wilson")
    return {"accuracy": correct / rows, "ci95": [round(interval.low, 4), round(interval.high, 4)], "rows": rows}


def right(probabilities: np.ndarray, labels: list[str], truth: Sequence[str], allowed: Sequence[str] | None = None
          ) -> list[bool]:
    """Whether each row's top label is the true one, choosing only among `allowed` labels when given."""
    if allowed is not None:
        mask = np.isin(np.array(labels), list(allowed))
        probabilities = np.where(mask, probabilities, -np.inf)
    predicted = probabilities.argmax(axis=1)
    return [labels[int(p)] == t for p, t in zip(predicted, truth, strict=True)]


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
    rows: GateRows,
    parity: Parity,
    min_agreement: float,
    config: GateConfig,
) -> dict[str, Any]:
    """Every check's verdict and figures; `passed` only when all pass. Without a live model, the comparisons
    have nothing to compare with and pass on the candidate's own figures."""
    checks: dict[str, dict[str, Any]] = {}
    everything = concat([rows.new_rows, rows.holdout])
    labels = candidate.labels
    scores = candidate.predict(everything.texts).probabilities  # every row scored once, for every check
    live_scores = live.predict(everything.texts).probabilities if live else scores
    n_new = len(rows.new_rows)
    new = wilson(sum(right(scores[:n_new], labels, rows.new_rows.labels)), n_new)
    checks["new_data_accuracy"] = new | {"floor": config.min_new_accuracy,
                                         "passed": new["accuracy"] >= config.min_new_accuracy}
    # Forgetting is about the data the live version was built on: the lineage's rows, not the new feedback's
    # (where every label may be known too, and where gains would hide a loss on the old data).
    known_labels = set(rows.known_labels)
    known = [i for i in range(n_new, len(everything)) if everything.labels[i] in known_labels]

    def compare(name: str, indices: list[int], tolerance: float, allowed: list[str] | None = None) -> None:
        truth = [everything.labels[i] for i in indices]
        result = paired(right(live_scores[indices], labels, truth, allowed),
                        right(scores[indices], labels, truth, allowed))
        checks[name] = result.as_dict() | {
            "tolerance": tolerance, "alpha": config.alpha,
            "passed": live is None or not indices or not result.worse_beyond(tolerance, config.alpha),
        }

    compare("no_regression_on_new_rows", list(range(n_new)), config.max_regression)
    compare("forgetting_on_known_labels", known, config.max_forgetting, rows.known_labels)
    checks["forgetting_on_known_labels"]["known_labels"] = len(rows.known_labels)
    if len(rows.known_labels) < len(labels):  # an expansion: what the new labels may cost the known ones
        compare("expansion_cost_on_known_labels", known, config.max_expansion_cost)
    compare("overall_vs_live", list(range(len(everything))), config.max_regression)
    checks["int8_parity"] = asdict(parity) | {"min_agreement": min_agreement, "passed": parity.argmax_agreement >= min_agreement}
    probe = rows.holdout.texts[:100]
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
