"""The backend table: `serve.backend` picks a registered loader; the eager one is imported only when chosen."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from services import live_model
from services.live_model import BACKENDS, Deferred, load_live_model, register_backend
from tuneloop.config import Settings
from tuneloop.inference import Scores
from tuneloop.registry import Manifest, Registry


class Warmed:
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def predict(self, texts: list[str]) -> Scores:
        self.seen.append(texts)
        p = np.ones((len(texts), 2), dtype=np.float32) / 2
        return Scores(logits=p, probabilities=p, sketch=np.zeros((len(texts), 2)))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path)
    with registry.staging() as stage:
        (stage / "model.onnx").write_bytes(b"stand-in")
        registry.publish(stage, base_model="base", labels=["neg", "pos"])
    return registry


def test_the_chosen_backend_is_built_from_the_verified_version_and_warmed_up(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[int, Path]] = []
    classifier = Warmed()

    def loader(manifest: Manifest, directory: Path, settings: Settings) -> Warmed:
        built.append((manifest.version, directory))
        return classifier

    monkeypatch.setitem(BACKENDS, "onnx", BACKENDS["onnx"])  # restored after the test
    register_backend("onnx", loader)
    live = load_live_model(registry, Settings())
    assert (live.version, live.backend, live.manifest.labels) == (1, "onnx", ["neg", "pos"])
    assert built == [(1, registry.version_dir(1))]
    assert classifier.seen == [["warm-up"]]


def test_an_unknown_backend_and_a_missing_extra_are_named(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    monkeypatch.delitem(BACKENDS, "torch")
    settings.serve.backend = "torch"
    with pytest.raises(RuntimeError, match=r"serve.backend=torch is not one of \['onnx'\]"):
        load_live_model(registry, settings)
    monkeypatch.setitem(BACKENDS, "torch", Deferred("no_such_module_anywhere", "Backend", needs="the train extra"))
    with pytest.raises(RuntimeError, match=r"serve.backend=torch needs the train extra installed \(No module named"):
        load_live_model(registry, settings)


def test_the_eager_backend_entry_names_a_class_with_from_version_without_importing_it() -> None:
    deferred = live_model.BACKENDS["torch"]
    assert isinstance(deferred, Deferred)
    spec = importlib.util.find_spec(deferred.module)
    assert spec is not None and spec.origin is not None
    classes = {node.name: node for node in ast.walk(ast.parse(Path(spec.origin).read_text())) if isinstance(node, ast.ClassDef)}
    methods = {item.name for item in classes[deferred.cls].body if isinstance(item, ast.FunctionDef)}
    assert "from_version" in methods
