"""From a trained adapter to a published registry version: merge, export, optimize, quantize, check, publish."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from exporters import onnx_export
from exporters.calibrated_int8 import Calibration, calibration_sample
from exporters.quantize import Parity, Recipe, attempts_as_dicts, quantize_until_parity
from exporters.temperature import fit_and_check
from trainer.data import write_csv
from trainer.model import predict, weights_digest
from trainer.runs import Candidate
from tuneloop.confidence import softmax
from tuneloop.config import Settings
from tuneloop.inference import OnnxTextClassifier
from tuneloop.reference import REFERENCE_FILE, Reference
from tuneloop.registry import Manifest, Registry

STEPS = ("reference logits", "save adapter", "merge + export ONNX", "optimize graph", "quantize + parity",
         "temperature + drift reference + gate", "publish")

# Judges a candidate (a fresh ONNX Runtime session on the staged files) and its int8 parity: {"passed", "checks"}.
Gate = Callable[[OnnxTextClassifier, Parity], dict[str, Any]]


def _accuracy(logits: np.ndarray, labels: list[str], label_names: list[str]) -> float:
    index = {name: i for i, name in enumerate(label_names)}
    return float(np.mean(logits.argmax(-1) == np.array([index[label] for label in labels])))


@dataclass(frozen=True)
class Release:
    """How a built candidate enters the registry.

    Without a gate the version is promoted (bootstrap). With one, it is promoted only when the gate passes
    (and `promote` holds: a rollout starts from it instead); otherwise it is kept, marked rejected with the
    gate's figures, and never served."""

    gate: Gate | None = None
    reason: str | None = None  # recorded in the history; default: "bootstrap" without a parent, else "published"
    promote: bool = True
    fence: Callable[[], None] | None = None  # called just before publishing; raises to publish nothing


def build_and_publish(
    registry: Registry, candidate: Candidate, settings: Settings, release: Release = Release(), progress: bool = True
) -> Manifest:
    """Publish the candidate as the next version; raises (publishing nothing) if no quantization reaches parity.

    Parity is checked on `candidate.parity_rows`. On `candidate.reference_rows`, rows training never saw, the scores'
    temperature and abstain threshold are chosen (exporters/temperature.py) and the drift reference is captured.
    `candidate.stored` are kept with the version as CSV (`data/<name>.csv`): what it was trained on is the next
    run's replay pool, and the original data's holdout travels down the lineage.
    `candidate.calibration_texts` (training rows; up to 200 are sampled) calibrate the static int8 recipe;
    without them it is skipped.
    """
    model, tokenizer, labels, base = candidate.model, candidate.tokenizer, candidate.labels, candidate.base
    val, gate, parent_version = candidate.parity_rows, release.gate, candidate.parent_version
    max_length = settings.model.max_seq_length
    encoder_config = model.get_base_model().encoder.config
    steps = tqdm(total=len(STEPS), desc="export", unit="step", disable=None if progress else True)
    seconds: dict[str, float] = {}  # per step, in the manifest: where the loop's time outside training goes
    mark = time.perf_counter()

    def step(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        seconds[name] = round(now - mark, 2)
        mark = now
        steps.set_postfix_str(name)
        steps.update(1)

    # The work directory sits beside the staged version, so what a killed export leaves is cleaned up with it.
    with registry.staging() as staged, tempfile.TemporaryDirectory(prefix="work-", dir=registry.staging_dir) as work:
        workdir = Path(work)
        model.to("cpu").eval()
        torch_logits, _ = predict(model, tokenizer, val.texts, max_length)
        step(STEPS[0])

        model.save_pretrained(staged / "adapter")
        step(STEPS[1])

        fp32_path = workdir / "model.fp32.onnx"
        onnx_export.export(onnx_export.merge(model), tokenizer, fp32_path, settings.export.opset)
        step(STEPS[2])

        optimized_path = workdir / "model.opt.onnx"
        fused = onnx_export.optimize(
            fp32_path, optimized_path, encoder_config.num_attention_heads, encoder_config.hidden_size
        )
        step(STEPS[3])

        tokenizer_dir = workdir / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        shutil.copy(tokenizer_dir / "tokenizer.json", staged / "tokenizer.json")
        (staged / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
        for name, rows in candidate.stored.items():
            write_csv(staged / "data" / f"{name}.csv", rows)
        export_info: dict[str, Any] = {
            "max_seq_length": max_length,
            "pad_token": tokenizer.pad_token,
            "opset": settings.export.opset,
            "fused_operators": fused,
            "outputs": onnx_export.OUTPUT_NAMES,
        }

        def int8_classifier(path: Path, recipe: Recipe) -> OnnxTextClassifier:
            return OnnxTextClassifier(
                path, staged / "tokenizer.json", labels, max_length, tokenizer.pad_token,
                max_rows_per_run=recipe.max_rows_per_run,
            )

        def int8_logits(path: Path, recipe: Recipe) -> np.ndarray:
            return int8_classifier(path, recipe).predict(val.texts).logits

        calibration = Calibration(calibration_sample(candidate.calibration_texts), staged / "tokenizer.json", max_length)
        recipe, parity, attempts = quantize_until_parity(
            optimized_path, staged / "model.onnx", torch_logits, int8_logits, settings.export.min_argmax_agreement,
            keep_best=gate is not None, calibration=calibration,
        )
        step(STEPS[4])
        onnx_model = int8_classifier(staged / "model.onnx", recipe)  # a fresh session on the staged files
        onnx_logits = onnx_model.predict(val.texts).logits
        reference = candidate.reference_rows
        reference_scores = onnx_model.predict(reference.texts)
        index = {name: i for i, name in enumerate(labels)}
        confidence = fit_and_check(reference_scores.logits, np.array([index[label] for label in reference.labels]),
                                   settings.train.seed, settings.export.abstain_accuracy_cost,
                                   index.get(settings.serve.out_of_scope_label or ""))
        onnx_model.temperature = confidence["temperature"]  # the drift reference sees the scores served
        reference_scores = replace(reference_scores,
                                   probabilities=softmax(reference_scores.logits, onnx_model.temperature))
        drift_reference = Reference.from_scores(reference_scores, reference.labels, labels)
        replace(drift_reference, abstain_below=confidence["abstain_below"]).save(staged / REFERENCE_FILE)
        verdict = gate(onnx_model, parity) if gate is not None else None
        step(STEPS[5])

        export_info |= {
            "quantization": recipe.name,
            "fp32_patterns": list(recipe.fp32_patterns),
            "max_rows_per_run": recipe.max_rows_per_run,
            "quantization_attempts": attempts_as_dicts(attempts),
            "confidence": confidence,  # temperature, abstain threshold, and what they do on held-out rows
            "seconds": dict(seconds),  # the publish step is not in it: it is what writes the manifest
        }
        metrics = {
            "val_rows": len(val),
            "val_accuracy_torch": _accuracy(torch_logits, val.labels, labels),
            "val_accuracy_onnx": _accuracy(onnx_logits, val.labels, labels),
            "parity": asdict(parity),
            "model_bytes": (staged / "model.onnx").stat().st_size,
            "fp32_model_bytes": optimized_path.stat().st_size,
        }
        if release.fence is not None:
            release.fence()
        manifest = registry.publish(
            staged,
            base_model=f"{base.model_id}@sha256:{weights_digest(base)}",
            labels=labels,
            parent_version=parent_version,
            training_data=candidate.training,
            metrics=metrics,
            export=export_info,
            reason=release.reason or ("bootstrap" if parent_version is None else "published"),
            status="accepted" if verdict is None or verdict["passed"] else "rejected",
            gate=verdict,
            promote=release.promote,
        )
        step(STEPS[6])
    steps.close()
    return manifest
