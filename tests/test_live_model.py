"""The backend table: `serve.backend` picks a registered loader; the eager one is imported only when chosen."""

from __future__ import annotations

import ast
import importlib.util
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

from services import live_model
from services.live_model import BACKENDS, Plugin, load_live_model
from tuneloop.config import BACKEND_ENTRY_POINTS, Settings
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

    monkeypatch.setitem(BACKENDS, "onnx", loader)  # restored after the test
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
    missing = EntryPoint("torch", "no_such_module_anywhere:Backend", BACKEND_ENTRY_POINTS)
    monkeypatch.setitem(BACKENDS, "torch", Plugin(missing))
    with pytest.raises(RuntimeError, match=r"serve.backend=torch cannot be imported \(No module named .*tuneloop\[train\]"):
        load_live_model(registry, settings)


def test_the_trainer_registers_the_eager_backend_as_an_entry_point_not_imported_until_chosen() -> None:
    plugin = live_model.BACKENDS["torch"]  # from the installed package's metadata (pyproject.toml)
    assert isinstance(plugin, Plugin) and plugin.entry_point.group == BACKEND_ENTRY_POINTS
    spec = importlib.util.find_spec(plugin.entry_point.module)
    assert spec is not None and spec.origin is not None
    classes = {node.name: node for node in ast.walk(ast.parse(Path(spec.origin).read_text())) if isinstance(node, ast.ClassDef)}
    methods = {item.name for item in classes[plugin.entry_point.attr].body if isinstance(item, ast.FunctionDef)}
    assert "from_version" in methods


def test_abstain_below_version_takes_each_versions_threshold_and_warns_when_one_has_none(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(BACKENDS, "onnx", lambda manifest, directory, settings: Warmed())
    with registry.staging() as stage:
        (stage / "model.onnx").write_bytes(b"stand-in 2")
        registry.publish(stage, base_model="base", labels=["neg", "pos"],
                         export={"confidence": {"temperature": 1.3, "abstain_below": 0.61}})
    settings = Settings()
    settings.serve.abstain_below = "version"
    with caplog.at_level("WARNING", logger="tuneloop.service"):
        assert load_live_model(registry, settings, version=2).abstain_below == pytest.approx(0.61)
        assert caplog.records == []
        assert load_live_model(registry, settings, version=1).abstain_below is None  # published before calibration
    assert [r.getMessage() for r in caplog.records] == [
        "serve.abstain_below is 'version' but v1 has no abstain threshold (exported before calibration, or too few "
        "held-out rows to choose one): it answers every text; set a probability to abstain"]
    settings.serve.abstain_below = 0.4
    assert load_live_model(registry, settings, version=1).abstain_below == 0.4
