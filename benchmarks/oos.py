"""Out-of-scope queries: how well a version's calibrated confidence tells texts it knows from texts it does not.

v1 is bootstrapped with the shipped defaults on CLINC150's 150 intents (`--per-intent` rows of each from the
train split; `build_v1`, what `tuneloop bootstrap` runs). It never sees an out-of-scope query in training (the
"oos-threshold" setting of Larson et al., EMNLP 2019). Its int8 model then scores CLINC150's validation and test
splits, in scope and out of scope, and the benchmark reports, with the scores as served (the version's
temperature) and as they were before calibration (temperature 1):

- in-scope accuracy, an abstention counted as a miss (the paper's measure), out-of-scope recall and precision
  (of the abstentions, how many were out of scope), at three thresholds: none; the version's own, chosen at
  export from in-scope rows alone (`export.abstain_accuracy_cost`); and the one of greatest accuracy over all
  validation rows, in scope and out of scope (the paper's choice), applied to the test rows;
- AUROC of the top score for in-scope against out-of-scope test rows, and ECE (15 bins) on in-scope test rows.

    .venv/bin/python benchmarks/oos.py              # benchmarks/results/oos.json and oos.png
    .venv/bin/python benchmarks/oos.py --markdown   # the README's table, from oos.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.scenarios import commit, machine  # noqa: E402
from exporters.temperature import answered_accuracy  # noqa: E402
from pipeline.versions import build_v1  # noqa: E402
from trainer import scenario  # noqa: E402
from trainer.data import LabelledTexts, write_csv  # noqa: E402
from tuneloop.clock import utc_now  # noqa: E402
from tuneloop.confidence import expected_calibration_error, softmax  # noqa: E402
from tuneloop.config import Settings  # noqa: E402
from tuneloop.inference import OnnxTextClassifier  # noqa: E402
from tuneloop.registry import Registry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ALL_DOMAINS = scenario.CLINC_DOMAINS  # all ten: 150 intents


def auroc(in_scope: np.ndarray, out_of_scope: np.ndarray) -> float:
    """Probability that an in-scope text scores higher than an out-of-scope one (ties count half)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(in_scope, out_of_scope).statistic / (len(in_scope) * len(out_of_scope)))


def at_threshold(probabilities: np.ndarray, truth: np.ndarray, out_top: np.ndarray, threshold: float | None
                 ) -> dict[str, float | None]:
    """In-scope accuracy (abstentions as misses), out-of-scope recall and precision at one threshold."""
    accuracy, in_abstained = answered_accuracy(probabilities, truth, threshold)
    limit = threshold or 0.0
    caught = int((out_top < limit).sum())
    wrongly = int(round(in_abstained * len(truth)))
    return {
        "threshold": None if threshold is None else round(threshold, 6),
        "in_scope_accuracy": round(accuracy, 4),
        "in_scope_abstained": round(in_abstained, 4),
        "oos_recall": round(caught / len(out_top), 4),
        "oos_precision": round(caught / (caught + wrongly), 4) if caught + wrongly else None,
    }


def best_on_validation(probabilities: np.ndarray, truth: np.ndarray, out_top: np.ndarray) -> float:
    """The threshold of greatest accuracy over all validation rows, an out-of-scope row right when abstained on:
    how Larson et al. chose theirs (github.com/clinc/oos-eval, issue 1)."""
    candidates = np.unique(np.concatenate([probabilities.max(axis=1), out_top]))
    scores = []
    for threshold in candidates:
        accuracy, _ = answered_accuracy(probabilities, truth, float(threshold))
        scores.append(accuracy * len(truth) + float((out_top < threshold).sum()))
    return float(candidates[int(np.argmax(scores))])


def curve(probabilities: np.ndarray, truth: np.ndarray, out_top: np.ndarray, points: int = 60) -> list[list[float]]:
    """(out-of-scope recall, in-scope accuracy) as the threshold moves over the score quantiles."""
    thresholds = np.quantile(np.concatenate([probabilities.max(axis=1), out_top]), np.linspace(0, 1, points))
    return [[float((out_top < t).mean()), answered_accuracy(probabilities, truth, float(t))[0]] for t in thresholds]


def evaluate(classifier: OnnxTextClassifier, labels: list[str], temperature: float, abstain_below: float | None,
             splits: dict[str, LabelledTexts]) -> dict[str, object]:
    index = {label: i for i, label in enumerate(labels)}
    logits = {name: classifier.predict(rows.texts).logits for name, rows in splits.items()}
    truth = {name: np.array([index[label] for label in splits[name].labels]) for name in ("val", "test")}
    figures: dict[str, object] = {}
    for name, t in (("uncalibrated", 1.0), ("calibrated", temperature)):
        p = {split: softmax(values, t) for split, values in logits.items()}
        out_val, out_test = p["oos_val"].max(axis=1), p["oos_test"].max(axis=1)
        chosen = best_on_validation(p["val"], truth["val"], out_val)
        figures[name] = {
            "temperature": t,
            "ece_in_scope_test": round(expected_calibration_error(p["test"], truth["test"]), 4),
            "auroc": round(auroc(p["test"].max(axis=1), out_test), 4),
            "no_threshold": at_threshold(p["test"], truth["test"], out_test, None),
            "chosen_on_validation": at_threshold(p["test"], truth["test"], out_test, chosen),
            "curve": curve(p["test"], truth["test"], out_test),
        }
    # The version's own threshold was chosen on calibrated scores; it means nothing on uncalibrated ones.
    calibrated = figures["calibrated"]
    assert isinstance(calibrated, dict)
    p_test = softmax(logits["test"], temperature)
    calibrated["version_threshold"] = at_threshold(p_test, truth["test"], softmax(logits["oos_test"], temperature)
                                                   .max(axis=1), abstain_below)
    return figures


def plot(figures: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4.5))
    for name, style in (("uncalibrated", "--"), ("calibrated", "-")):
        points = np.array(figures[name]["curve"])
        axis.plot(points[:, 0], points[:, 1], style, label=f"{name} (AUROC {figures[name]['auroc']:.3f})")
        chosen = figures[name]["chosen_on_validation"]
        axis.plot(chosen["oos_recall"], chosen["in_scope_accuracy"], "o", color=axis.lines[-1].get_color())
    own = figures["calibrated"]["version_threshold"]
    axis.plot(own["oos_recall"], own["in_scope_accuracy"], "s", color="black", label="the version's own threshold")
    axis.set_xlabel("out-of-scope recall (test)")
    axis.set_ylabel("in-scope accuracy, abstentions as misses (test)")
    axis.set_title("CLINC150, 150 intents: abstaining on low scores")
    axis.legend(fontsize=8, loc="lower left")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-intent", type=int, default=30, help="training rows per intent (train split)")
    parser.add_argument("--out", type=Path, default=RESULTS / "oos.json")
    parser.add_argument("--markdown", action="store_true", help="print the README's table from --out and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    started = time.time()
    settings = Settings()
    labels = scenario.domain_labels(ALL_DOMAINS)
    with tempfile.TemporaryDirectory(prefix="oos-") as work:
        data = write_csv(Path(work) / "train.csv", scenario.sample(ALL_DOMAINS, "train", args.per_intent, seed=0))
        registry = Registry(Path(work) / "registry")
        print(f"bootstrapping v1 on {args.per_intent} rows of each of {len(labels)} intents", flush=True)
        built = build_v1(settings, registry, data, labels, progress=True)
        manifest, directory = registry.resolve()
        classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
        splits = {
            "val": scenario.sample(ALL_DOMAINS, "val", None, seed=0),
            "oos_val": scenario.out_of_scope("val", None, seed=0),
            "test": scenario.sample(ALL_DOMAINS, "test", None, seed=0),
            "oos_test": scenario.out_of_scope("test", None, seed=0),
        }
        figures = evaluate(classifier, manifest.labels, manifest.temperature, manifest.abstain_below, splits)
    result = {
        "data": {name: len(rows) for name, rows in splits.items()} | {"train": len(built.run.train),
                                                                       "per_intent": args.per_intent},
        "labels": len(labels),
        "export_confidence": manifest.export.get("confidence"),
        "quantization": manifest.export.get("quantization"),
        **figures,
        "machine": machine(), "date": utc_now(), "commit": commit(), "took_s": round(time.time() - started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(figures, args.out.with_suffix(".png"))
    print(markdown(result))
    print(f"results in {args.out}; plot {args.out.with_suffix('.png')}")


def markdown(result: dict) -> str:
    rows = ["| scores | threshold | in-scope accuracy | out-of-scope recall | out-of-scope precision | AUROC | ECE |",
            "|---|---|---|---|---|---|---|"]
    for name in ("uncalibrated", "calibrated"):
        figures = result[name]
        points = [("none", figures["no_threshold"]), ("chosen on validation", figures["chosen_on_validation"])]
        if "version_threshold" in figures:
            points.append(("the version's own", figures["version_threshold"]))
        for which, point in points:
            shown = "-" if point["threshold"] is None else f"{point['threshold']:.3f}"
            precision = "-" if point["oos_precision"] is None else f"{point['oos_precision']:.3f}"
            rows.append(f"| {name} (T = {figures['temperature']:.2f}) | {which}: {shown} | "
                        f"{point['in_scope_accuracy']:.3f} | {point['oos_recall']:.3f} | {precision} | "
                        f"{figures['auroc']:.3f} | {figures['ece_in_scope_test']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
