"""The calibrated static int8 recipe: its graph transforms on tiny graphs, and model v1 as bootstrap publishes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters import calibrated_int8 as ci
from exporters.quantize import RECIPES, quantize_until_parity
from tests.support.data import validation_split
from tuneloop.inference import OnnxTextClassifier
from tuneloop.registry import Registry

MAX_MODEL_BYTES = 25_000_000


def matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    """x (batch, tokens, K) @ weight -> y: the smallest graph a feed-forward transform applies to."""
    k, n = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="ffn/MatMul")
    graph = helper.make_graph(
        [node], "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_outlier_channels_run_in_fp32_and_the_int8_scale_fits_the_rest() -> None:
    rng = np.random.default_rng(0)
    k, n, outliers = 64, 32, (5, 40)
    x = rng.standard_normal((8, 16, k)).astype(np.float32)
    x[..., outliers] *= 40  # what LayerNorm and GELU outputs look like in a BERT encoder
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    model = matmul_model(weight)
    exact = run(model, x)
    rows = x.reshape(-1, k)
    stats = {"x": ci.ChannelStats(rows.min(0), rows.max(0))}
    stats["x"].observe(rows, for_hessian=True)

    plan = ci.transform(model, ci.Layers(feed_forward=[model.graph.node[0]]), stats)
    np.testing.assert_allclose(run(model, x), exact, atol=1e-4)  # the fp32 rewrite is exact
    int8 = plan["ffn/MatMul"]
    assert np.all(int8.weight[list(outliers)] == 0)  # those rows run in the fp32 side branch
    assert int8.high < 0.2 * float(rows.max())  # the int8 range no longer spans the outliers

    ci.quantize_static(model, plan)
    ops = [node.op_type for node in model.graph.node]
    assert {"QuantizeLinear", "MatMulIntegerToFloat", "Gather", "Add"} <= set(ops) and "MatMul" in ops
    calibrated_error = np.abs(run(model, x) - exact).mean()
    # Per-tensor int8 of the same input without the split: the outliers set the scale for every channel.
    scale = (rows.max() - min(rows.min(), 0)) / 255
    zero = np.round(-min(rows.min(), 0) / scale)
    x_naive = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    q, w_scale = ci.round_to_nearest(weight)
    naive_error = np.abs(x_naive @ (q * w_scale) - exact).mean()
    assert calibrated_error < naive_error / 4, (calibrated_error, naive_error)


def test_gptq_has_a_lower_output_error_than_rounding_each_weight() -> None:
    rng = np.random.default_rng(1)
    k, n = 96, 48
    mixing = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((2048, k)) @ mixing).astype(np.float32)  # correlated channels, as in activations
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    hessian = (x.T.astype(np.float64) @ x) / len(x)
    exact = x @ weight
    errors = {}
    for name, (q, scale) in {"gptq": ci.gptq(weight, hessian), "nearest": ci.round_to_nearest(weight)}.items():
        assert q.dtype == np.int8 and np.abs(q).max() <= 127
        errors[name] = float(np.mean((x @ (q * scale) - exact) ** 2))
    assert errors["gptq"] < 0.8 * errors["nearest"], errors


def test_calibration_sample_is_seeded_capped_and_in_order() -> None:
    texts = [f"text {i}" for i in range(500)]
    sample = ci.calibration_sample(texts)
    assert len(sample) == ci.CALIBRATION_TEXTS
    assert sample == ci.calibration_sample(texts)
    assert list(sample) == sorted(sample, key=texts.index)
    assert ci.calibration_sample(texts[:30]) == tuple(texts[:30])


def test_a_graph_the_calibrated_recipe_does_not_know_falls_back_to_dynamic_int8(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    source = tmp_path / "plain.onnx"
    onnx.save(matmul_model((rng.standard_normal((16, 3)) / 4).astype(np.float32)), source)
    x = rng.standard_normal((1, 64, 16)).astype(np.float32)

    def logits(path: Path, _recipe: object) -> np.ndarray:
        return run(onnx.load(str(path)), x)[0]

    calibration = ci.Calibration(("a text",), tmp_path / "tokenizer.json", 16)
    recipe, parity, attempts = quantize_until_parity(
        source, tmp_path / "model.onnx", logits(source, None), logits, 0.9, calibration=calibration)
    assert RECIPES[0].name == "int8-calibrated"
    assert attempts[0].recipe == "int8-calibrated" and attempts[0].parity is None and not attempts[0].passed
    assert attempts[0].error.startswith("UnsupportedGraph")
    assert recipe.name == attempts[1].recipe == "int8-per-channel" and attempts[1].passed
    assert parity.argmax_agreement >= 0.9 and (tmp_path / "model.onnx").is_file()


@pytest.mark.slow
def test_bootstrap_tries_the_calibrated_recipe_first(registry_path: Path) -> None:
    manifest, directory = Registry(registry_path).resolve()
    export = manifest.export
    first = export["quantization_attempts"][0]
    print(f"int8-calibrated: built in {first['build_seconds']} s, agreement {first['parity']['argmax_agreement']:.4f}, "
          f"published {export['quantization']}, {manifest.metrics['model_bytes'] / 1e6:.1f} MB")
    assert first["recipe"] == "int8-calibrated" and first["error"] is None
    assert 0 < first["build_seconds"] < 120
    # One flip is 0.7 % of the 140 parity rows, and CPU training is not bit-reproducible: the 99 % gate
    # may send a v1 to the dynamic fallback now and then (published all the same); the recipe itself must be close.
    assert first["parity"]["argmax_agreement"] >= 0.98
    if first["passed"]:
        assert export["quantization"] == "int8-calibrated"
        assert export["max_rows_per_run"] is None  # static scales: texts may share a run
        assert manifest.metrics["model_bytes"] == (directory / "model.onnx").stat().st_size <= MAX_MODEL_BYTES


@pytest.mark.slow
def test_calibrated_v1_agrees_with_pytorch(registry_path: Path, torch_reference: np.ndarray) -> None:
    manifest, directory = Registry(registry_path).resolve()
    classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
    logits = classifier.predict(validation_split().texts).logits
    agreement = float(np.mean(logits.argmax(-1) == torch_reference.argmax(-1)))
    print(f"int8-calibrated vs PyTorch: agreement {agreement:.4f}, max |logit diff| "
          f"{np.abs(logits - torch_reference).max():.4f} on {len(logits)} rows")
    assert agreement >= 0.99


@pytest.mark.slow
def test_a_text_scores_the_same_alone_and_in_a_padded_batch_of_mixed_lengths(registry_path: Path) -> None:
    manifest, directory = Registry(registry_path).resolve()
    export = manifest.export
    if export["quantization"] != "int8-calibrated":
        pytest.skip(f"this v1 fell back to {export['quantization']} (dynamic scales run one text at a time)")
    classifier = OnnxTextClassifier(
        directory / "model.onnx", directory / "tokenizer.json", manifest.labels, int(export["max_seq_length"]),
        str(export["pad_token"]), max_padding_waste=1e9, max_rows_per_run=None,  # one run, padded to the longest
    )
    rows = sorted(validation_split().texts, key=len)
    texts = ["Great.", *rows[:10], *rows[-10:], " ".join(rows[-12:]), "Not good at all, sadly."]
    together = classifier.predict(texts)
    assert together.tokens.min() <= 4 and together.tokens.max() == export["max_seq_length"]  # one run, padded
    alone = [classifier.predict([text]) for text in texts]
    alone_probabilities = np.concatenate([scores.probabilities for scores in alone])
    np.testing.assert_array_equal(together.probabilities.argmax(-1), alone_probabilities.argmax(-1))
    np.testing.assert_allclose(together.probabilities, alone_probabilities, rtol=0, atol=1e-4)
