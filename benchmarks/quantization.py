"""Quantization benchmark: argmax parity, accuracy against fp32, build time, size and single-text latency of
each int8 recipe, for one version or for the served version of every scenario of a suite run.

Rebuilds the version's fp32 ONNX graph from its stored adapter (merge -> export -> optimize), scores
the export's parity rows (`data/val.csv` and `data/holdout.csv`: every labelled row the version keeps
that it was not trained on) with PyTorch, then quantizes with every recipe of `exporters.quantize` (the
calibrated one on a sample of the version's training rows, `data/train.csv`, as the exporter does) and
reports agreement with PyTorch, accuracy on those rows paired with PyTorch's (exact McNemar: is int8
less accurate?) and the median single-text latency of a fresh ONNX Runtime session (one thread). A
recipe that cannot be built is recorded with its error; with --suite the results file is rewritten
after each scenario.

    .venv/bin/python benchmarks/quantization.py --registry var/bench-loop/registry --version 2
    .venv/bin/python benchmarks/quantization.py --suite var/scenarios   # every <scenario>/registry's live version
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from exporters import onnx_export  # noqa: E402
from exporters.calibrated_int8 import Calibration, calibration_sample  # noqa: E402
from exporters.quantize import RECIPES, parity, quantize  # noqa: E402
from trainer.data import concat, load_csv  # noqa: E402
from trainer.model import load_adapted, load_tokenizer, predict, resolve_base  # noqa: E402
from tuneloop.clock import utc_now  # noqa: E402
from tuneloop.comparison import paired  # noqa: E402
from tuneloop.config import Settings  # noqa: E402
from tuneloop.inference import OnnxTextClassifier  # noqa: E402
from tuneloop.registry import Registry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def median_latency_ms(classifier: OnnxTextClassifier, texts: list[str], repeats: int = 200) -> float:
    classifier.predict(texts[:1])
    timings = []
    for i in range(repeats):
        started = time.perf_counter()
        classifier.predict([texts[i % len(texts)]])
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings) * 1000, 2)


def measure(registry: Path, version: int | None) -> dict[str, object]:
    """Every recipe on one version (None: the live one)."""
    settings = Settings()
    manifest, directory = Registry(registry).resolve(version)
    rows = concat([load_csv(directory / "data" / name) for name in ("val.csv", "holdout.csv")
                   if (directory / "data" / name).is_file()])
    base = resolve_base(settings.model)
    tokenizer = load_tokenizer(base)
    model = load_adapted(base, directory / "adapter", len(manifest.labels), settings.model).eval()
    max_length = int(manifest.export["max_seq_length"])
    reference, _ = predict(model, tokenizer, rows.texts, max_length)
    truth = [manifest.labels.index(label) for label in rows.labels]
    reference_right = [int(i) == t for i, t in zip(reference.argmax(axis=1), truth, strict=True)]

    def figures(classifier: OnnxTextClassifier) -> dict[str, object]:
        logits = classifier.predict(rows.texts).logits
        right = [int(i) == t for i, t in zip(logits.argmax(axis=1), truth, strict=True)]
        versus, agreement = paired(reference_right, right), parity(reference, logits)
        return {"rows": len(rows), "argmax_agreement": round(agreement.argmax_agreement, 4),
                "max_abs_logit_diff": round(agreement.max_abs_logit_diff, 3),
                "accuracy": round(versus.candidate_accuracy, 4), "fp32_accuracy": round(versus.reference_accuracy, 4),
                "p_less_accurate": float(f"{versus.p_worse:.4g}"),
                "median_single_text_ms": median_latency_ms(classifier, rows.texts)}

    config = model.get_base_model().encoder.config
    results = []
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        fp32 = work_dir / "model.fp32.onnx"
        onnx_export.export(onnx_export.merge(model), tokenizer, fp32, settings.export.opset)
        optimized = work_dir / "model.opt.onnx"
        onnx_export.optimize(fp32, optimized, config.num_attention_heads, config.hidden_size)
        import onnx

        graph = onnx.load(str(optimized), load_external_data=False).graph
        calibration = Calibration(calibration_sample(load_csv(directory / "data" / "train.csv").texts),
                                  directory / "tokenizer.json", max_length)
        for recipe in RECIPES:
            target = work_dir / f"{recipe.name}.onnx"
            started = time.perf_counter()
            try:
                quantize(optimized, target, recipe, graph, calibration)
            except Exception as exc:  # as the exporter does: record why, try the next recipe
                results.append({"recipe": recipe.name, "error": f"{type(exc).__name__}: {exc}"})
                print(json.dumps(results[-1]), flush=True)
                continue
            build_seconds = round(time.perf_counter() - started, 2)
            classifier = OnnxTextClassifier(target, directory / "tokenizer.json", manifest.labels, max_length,
                                            manifest.export["pad_token"], intra_op_threads=1,
                                            max_rows_per_run=recipe.max_rows_per_run)
            results.append({"recipe": recipe.name, "build_seconds": build_seconds, **figures(classifier),
                            "bytes": target.stat().st_size})
            print(json.dumps(results[-1]), flush=True)
        fp32_classifier = OnnxTextClassifier(optimized, directory / "tokenizer.json", manifest.labels, max_length,
                                             manifest.export["pad_token"], intra_op_threads=1)
        results.append({"recipe": "fp32 (optimized, not quantized)", **figures(fp32_classifier),
                        "bytes": optimized.stat().st_size})
        print(json.dumps(results[-1]), flush=True)
    return {"registry_version": manifest.version, "labels": len(manifest.labels),
            "published_recipe": manifest.export.get("quantization"), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--registry", type=Path, help="one registry (with --version)")
    target.add_argument("--suite", type=Path, help="a scenario suite's --workdir: the live version of each scenario")
    parser.add_argument("--version", type=int, help="with --registry; default the live version")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantization.json")
    parser.add_argument("--markdown", action="store_true", help="print the README's table from a --suite --out and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    if args.suite is not None and args.version is not None:
        parser.error("--version goes with --registry; --suite measures each scenario's live version")
    if args.registry is None and args.suite is None:
        parser.error("one of --registry, --suite or --markdown is needed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.registry is not None:
        args.out.write_text(json.dumps(measure(args.registry, args.version), indent=2) + "\n")
        return
    scenarios: list[dict[str, object]] = []
    for workdir in sorted(p for p in args.suite.iterdir() if (p / "registry" / "live").is_file()):
        print(f"{workdir.name}:", flush=True)
        scenarios.append({"scenario": workdir.name, **measure(workdir / "registry", None)})
        report = {"suite": str(args.suite), "measured": utc_now(), "scenarios": scenarios}
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def markdown(report: dict) -> str:
    """Recipes down, scenarios across: agreement with PyTorch, accuracy change against fp32, single-text ms."""
    scenarios = report["scenarios"]
    lines = ["| recipe | " + " | ".join(f"`{s['scenario']}`" for s in scenarios) + " |",
             "|---|" + "---|" * len(scenarios)]
    for name in [r["recipe"] for r in scenarios[0]["results"]]:
        cells = []
        for scenario in scenarios:
            row = next(r for r in scenario["results"] if r["recipe"] == name)
            if "error" in row:
                cells.append("not built")
                continue
            change = 100 * (row["accuracy"] - row["fp32_accuracy"])
            cells.append(f"{100 * row['argmax_agreement']:.1f} %, {change:+.1f} pt, {row['median_single_text_ms']:.2f} ms, "
                         f"{row['bytes'] / 1e6:.0f} MB")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("| parity rows; published | " + " | ".join(
        f"{s['results'][0].get('rows', '-')}; `{s['published_recipe']}`" for s in scenarios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
