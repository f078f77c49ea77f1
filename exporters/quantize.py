"""int8 quantization, tried recipe by recipe until argmax parity with PyTorch holds.

The first recipe, `int8-calibrated` (exporters/calibrated_int8.py), calibrates static activation
scales on up to 200 training texts, keeps the feed-forward layers' outlier input channels in fp32,
smooths the attention input and quantizes weights with GPTQ. On a hard CLINC150 candidate
fine-tuned on feedback (90 labels, 630 rows) it agreed with PyTorch on 98.7-99.5 % of rows
(five calibration samples) where plain dynamic int8 agreed on 97.0 %, in 24.4 MB instead of
58.6 MB at +9 % single-text latency. Its scales are fixed, so a text's scores do not depend on
its batch and texts may share a run. It needs calibration
texts; when it cannot be built (no texts, a graph it does not recognise) the attempt records why
and the dynamic recipes follow.

Plain dynamic int8 can flip close calls (a prototype agreed with fp32 on 100 % of easy
sentences but 93 % of ambiguous ones), so the dynamic recipes go from smallest and fastest to
more fp32: per-channel weight scales first, then the same with 7-bit weights, then the
head kept in fp32, then the feed-forward layers kept in fp32, then only the attention
projections quantized.

7-bit weights (`reduce_range`) keep the u8 x s8 products of the int8 kernels from
saturating their 16-bit intermediate sums. On a CLINC150 candidate fine-tuned on
feedback (90 labels, 666 rows; `benchmarks/quantization.py`) full int8 agreed with
PyTorch on 98.3 % of rows in 1.8 ms a text, 7-bit weights on 99.4 % in 1.9 ms, and
keeping the feed-forward layers in fp32 on 99.6 % in 4.2 ms.

Measured on v1 (200 validation rows, mean |logit error| vs PyTorch with only one family
quantized): feed-forward output 0.054, feed-forward intermediate 0.046, attention 0.021,
attention output 0.007. The error is spread evenly over the layers, so keeping single
"sensitive" nodes in fp32 did not help; whole families do.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from exporters import calibrated_int8
from exporters.calibrated_int8 import Calibration
from tuneloop.errors import ParityError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str
    op_types: tuple[str, ...]
    fp32_head: bool
    fp32_patterns: tuple[str, ...] = ()  # regular expressions over node names kept in fp32
    reduce_range: bool = False  # 7-bit weights
    # Dynamic activation scales are per tensor: rows must run alone to be independent of their batch.
    max_rows_per_run: int | None = 1
    calibrated: bool = False  # static scales calibrated on training texts (calibrated_int8), not quantize_dynamic


FEED_FORWARD = (r"/intermediate/dense/", r"layer\.\d+/output/dense/")
RECIPES = (
    # Static scales: a text's scores do not depend on its batch, so texts may share a run.
    Recipe("int8-calibrated", ("MatMul", "Attention"), fp32_head=True, max_rows_per_run=None, calibrated=True),
    Recipe("int8-per-channel", ("MatMul", "Attention"), fp32_head=False),
    Recipe("int8-per-channel-7bit", ("MatMul", "Attention"), fp32_head=False, reduce_range=True),
    Recipe("int8-per-channel-fp32-head", ("MatMul", "Attention"), fp32_head=True),
    Recipe("int8-attention-fp32-feed-forward", ("MatMul", "Attention"), fp32_head=True, fp32_patterns=FEED_FORWARD),
    Recipe(
        "int8-attention-projections-only",
        ("Attention",),
        fp32_head=True,
        fp32_patterns=(*FEED_FORWARD, r"attention/output/dense/"),
    ),
)


@dataclass(frozen=True)
class Parity:
    rows: int
    argmax_agreement: float
    max_abs_logit_diff: float


@dataclass(frozen=True)
class Attempt:
    recipe: str
    parity: Parity | None  # None: the recipe could not be built or run (see error)
    passed: bool
    build_seconds: float
    error: str | None = None


def parity(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> Parity:
    if reference_logits.shape != candidate_logits.shape:
        raise ValueError(f"logit shapes differ: {reference_logits.shape} vs {candidate_logits.shape}")
    agreement = float(np.mean(reference_logits.argmax(-1) == candidate_logits.argmax(-1)))
    return Parity(len(reference_logits), agreement, float(np.abs(reference_logits - candidate_logits).max()))


def head_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes after pooling: the classifier and the sketch projection (output-side, tiny, precision-sensitive)."""
    return [node.name for node in graph.node if "classifier" in node.name or any(o == "sketch" for o in node.output)]


def fp32_nodes(graph: onnx.GraphProto, recipe: Recipe) -> list[str]:
    """The nodes a recipe keeps in fp32: those matching its patterns, plus the head when it says so."""
    excluded = [node.name for node in graph.node if any(re.search(p, node.name) for p in recipe.fp32_patterns)]
    return excluded + (head_nodes(graph) if recipe.fp32_head else [])


def quantize(
    source: Path, target: Path, recipe: Recipe, graph: onnx.GraphProto, calibration: Calibration | None = None
) -> None:
    """Quantize `source` (whose graph is `graph`) with one recipe into `target`; calibrated recipes need `calibration`."""
    excluded = fp32_nodes(graph, recipe)
    if recipe.calibrated:
        if calibration is None or not calibration.texts:
            raise ValueError(f"{recipe.name} needs calibration texts; none were given")
        calibrated_int8.build(source, target, calibration, keep_fp32=excluded)
        return
    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=list(recipe.op_types),
        per_channel=True,
        reduce_range=recipe.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded or None,
        # Fused com.microsoft ops defeat shape inference; their outputs are float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def quantize_until_parity(
    source: Path,
    target: Path,
    reference_logits: np.ndarray,
    run_logits: Callable[[Path, Recipe], np.ndarray],
    min_agreement: float,
    keep_best: bool = False,
    calibration: Calibration | None = None,
) -> tuple[Recipe, Parity, list[Attempt]]:
    """Quantize with each recipe in turn; keep the first whose logits agree with the reference.

    A recipe that cannot be built or run is recorded with its error and the next one is tried.
    When none passes: raise ParityError, or with keep_best return the closest one, for a gate to
    reject with its figures (a rejected candidate is kept on record, never served).
    """
    graph = onnx.load(str(source), load_external_data=False).graph  # read once, not per attempt
    attempts: list[Attempt] = []
    best: tuple[Recipe, Parity, Path] | None = None
    with tempfile.TemporaryDirectory(prefix="tuneloop-quantize-") as work:
        for recipe in RECIPES:
            candidate = Path(work) / f"{recipe.name}.onnx"
            started = time.perf_counter()
            try:
                quantize(source, candidate, recipe, graph, calibration)
                build_seconds = round(time.perf_counter() - started, 2)
                result = parity(reference_logits, run_logits(candidate, recipe))
            except Exception as exc:  # a recipe that cannot handle this graph must not stop the export
                log.warning("quantization recipe %s failed; trying the next one", recipe.name, exc_info=True)
                elapsed = round(time.perf_counter() - started, 2)
                attempts.append(Attempt(recipe.name, None, False, elapsed, f"{type(exc).__name__}: {exc}"))
                continue
            passed = result.argmax_agreement >= min_agreement
            attempts.append(Attempt(recipe.name, result, passed, build_seconds))
            if passed:
                shutil.move(candidate, target)
                return recipe, result, attempts
            if keep_best and (best is None or result.argmax_agreement > best[1].argmax_agreement):
                if best is not None:
                    best[2].unlink()
                best = recipe, result, candidate
            else:
                candidate.unlink(missing_ok=True)
        if keep_best and best is not None:
            shutil.move(best[2], target)
            return best[0], best[1], attempts
    tried = "; ".join(
        f"{a.recipe}: {a.parity.argmax_agreement:.4f}" if a.parity else f"{a.recipe}: {a.error}" for a in attempts
    )
    raise ParityError(f"no int8 recipe reached {min_agreement:.2%} argmax agreement with PyTorch ({tried})")


def attempts_as_dicts(attempts: list[Attempt]) -> list[dict[str, object]]:
    return [asdict(a) for a in attempts]
