"""Model v1 as `tuneloop bootstrap` publishes it: manifest, ONNX-vs-PyTorch parity, tokenizer parity."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.support.data import imdb_parts, validation_split
from tests.support.processes import run_cli, tuneloop_env
from trainer.data import load_csv
from trainer.model import load_tokenizer, resolve_base
from tuneloop.config import Settings
from tuneloop.inference import OnnxTextClassifier
from tuneloop.registry import Registry

pytestmark = pytest.mark.slow


def test_manifest_records_lineage_data_and_checks(registry_path: Path) -> None:
    manifest = Registry(registry_path).verify(1)
    assert manifest.parent_version is None
    assert manifest.labels == ["negative", "positive"]
    assert manifest.base_model.startswith("sentence-transformers/all-MiniLM-L6-v2@sha256:")
    assert manifest.training_data["sha256"] == load_csv(imdb_parts()[0]).source["sha256"]
    assert manifest.training_data["train_rows"] == 560
    assert manifest.metrics["val_rows"] == 140
    assert manifest.metrics["parity"]["argmax_agreement"] >= 0.99
    assert {"model.onnx", "tokenizer.json", "labels.json", "adapter/adapter_model.safetensors"} <= set(manifest.files)
    # The rows it trained on (the next run's replay pool) and the rows it never did (early stopping's, the gate's).
    assert {"data/train.csv", "data/val.csv", "data/holdout.csv"} <= set(manifest.files)
    assert len(load_csv(registry_path / "versions" / "v1" / "data" / "val.csv")) == 70
    assert Registry(registry_path).history()[0].reason == "bootstrap"


def test_onnx_int8_agrees_with_pytorch_on_the_validation_split(registry_path: Path, torch_reference: np.ndarray) -> None:
    manifest, directory = Registry(registry_path).resolve()
    onnx_logits = OnnxTextClassifier.from_version(manifest, directory, "cpu").predict(validation_split().texts).logits
    agreement = float(np.mean(onnx_logits.argmax(-1) == torch_reference.argmax(-1)))
    max_diff = float(np.abs(onnx_logits - torch_reference).max())
    print(f"int8 ONNX vs PyTorch: agreement {agreement:.4f}, max |logit diff| {max_diff:.4f}")
    assert agreement >= 0.99
    # The export records the same figure it measured; an independent recomputation must match it.
    assert agreement == pytest.approx(manifest.metrics["parity"]["argmax_agreement"], abs=1e-9)


def test_graph_is_fused_and_int8(registry_path: Path) -> None:
    _, directory = Registry(registry_path).resolve()
    ops = Counter(node.op_type for node in onnx.load(str(directory / "model.onnx")).graph.node)
    assert ops["QAttention"] + ops["Attention"] == 6  # one fused attention per encoder layer
    assert ops["MatMulInteger"] + ops["MatMulIntegerToFloat"] > 0  # dynamic recipes / the calibrated one
    assert ops["SkipLayerNormalization"] > 0


def test_serving_tokenizer_matches_the_training_tokenizer(registry_path: Path) -> None:
    manifest, directory = Registry(registry_path).resolve()
    served = OnnxTextClassifier.from_version(manifest, directory, "cpu").tokenizer
    hf = load_tokenizer(resolve_base(Settings().model))
    texts = validation_split().texts + ["", "x" * 3000, "Ünïcödé — ✓ emoji 🎬", "  spaced   out  "]
    for text in texts:
        expected = hf(text, truncation=True, max_length=manifest.export["max_seq_length"])["input_ids"]
        assert served.encode(text).ids == expected, text


def test_a_texts_scores_do_not_depend_on_its_batch(registry_path: Path) -> None:
    manifest, directory = Registry(registry_path).resolve()
    classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
    texts = validation_split().texts[:48]
    together = classifier.predict(texts).probabilities
    alone = np.concatenate([classifier.predict([text]).probabilities for text in texts])
    np.testing.assert_array_equal(together.argmax(-1), alone.argmax(-1))
    # Exactly equal when rows run alone (dynamic recipes); within float summation order when they share a run.
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-4)


def test_bootstrap_if_empty_keeps_the_served_version(registry_path: Path) -> None:
    result = run_cli("bootstrap", "--data", str(imdb_parts()[0]), "--if-empty", env=tuneloop_env(registry_path))
    assert "already serves v1" in result.stdout
    assert Registry(registry_path).list_versions() == [1]


def test_bootstrap_rejects_bad_data_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,score\nhello,1\n")
    result = run_cli("bootstrap", "--data", str(bad), env=tuneloop_env(tmp_path / "reg"), check=False)
    assert result.returncode == 2
    assert "columns 'text' and 'label'" in result.stdout
    assert not (tmp_path / "reg" / "versions").exists()
