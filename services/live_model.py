"""The model a replica serves: a verified registry version behind one inference backend.

Backends are chosen by `serve.backend` from a registered list (`BACKENDS`): name -> loader.
ONNX Runtime is the serving backend. The PyTorch-eager backend lives with the trainer (it needs
torch and the train extra); its entry names the module and class, imported on first use only, so
the serving path never imports torch and `services/` imports nothing from the trainer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tuneloop.config import Settings
from tuneloop.inference import OnnxTextClassifier, Scores
from tuneloop.registry import Manifest, Registry


class TextClassifier(Protocol):
    def predict(self, texts: list[str]) -> Scores: ...


# Builds a backend for a verified version: (manifest, its directory, settings) -> classifier.
Loader = Callable[[Manifest, Path, Settings], TextClassifier]


@dataclass(frozen=True)
class LiveModel:
    version: int
    manifest: Manifest
    classifier: TextClassifier
    backend: str


def _onnx(manifest: Manifest, directory: Path, settings: Settings) -> TextClassifier:
    serve = settings.serve
    return OnnxTextClassifier.from_version(manifest, directory, serve.execution_provider, serve.intra_op_threads)


@dataclass(frozen=True)
class Deferred:
    """A backend from another package, imported when first chosen: `module.cls.from_version(...)`."""

    module: str
    cls: str
    needs: str  # what to install when the import fails

    def __call__(self, manifest: Manifest, directory: Path, settings: Settings) -> TextClassifier:
        try:
            backend = getattr(importlib.import_module(self.module), self.cls)
        except ImportError as exc:
            raise RuntimeError(f"serve.backend={settings.serve.backend} needs {self.needs} installed ({exc})") from exc
        return backend.from_version(manifest, directory, settings)


BACKENDS: dict[str, Loader] = {
    "onnx": _onnx,
    "torch": Deferred("trainer.eager_backend", "EagerTextClassifier", needs="the train extra"),
}


def register_backend(name: str, loader: Loader) -> None:
    """Add (or replace) a backend that `serve.backend` can name."""
    BACKENDS[name] = loader


def load_live_model(registry: Registry, settings: Settings, version: int | None = None) -> LiveModel:
    """Verify every file of a version (default: the live one), build its backend and warm it up."""
    manifest, directory = registry.resolve(version)
    backend = settings.serve.backend
    try:
        loader = BACKENDS[backend]
    except KeyError:
        raise RuntimeError(f"serve.backend={backend} is not one of {sorted(BACKENDS)}") from None
    classifier = loader(manifest, directory, settings)
    classifier.predict(["warm-up"])  # first run allocates buffers; keep that off the first user request
    return LiveModel(manifest.version, manifest, classifier, backend)
