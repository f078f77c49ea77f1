"""The model a replica serves: a verified registry version behind one inference backend."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from tuneloop.config import Settings
from tuneloop.inference import OnnxTextClassifier, Scores
from tuneloop.registry import Manifest, Registry

# The eager backend lives with the trainer (it needs torch); it is loaded by name only when
# serve.backend=torch, so the serving path never imports torch.
EAGER_BACKEND = "trainer.eager_backend"


class TextClassifier(Protocol):
    def predict(self, texts: list[str]) -> Scores: ...


@dataclass(frozen=True)
class LiveModel:
    version: int
    manifest: Manifest
    classifier: TextClassifier
    backend: str


def load_live_model(registry: Registry, settings: Settings, version: int | None = None) -> LiveModel:
    """Verify every file of a version (default: the current one), build its backend and warm it up."""
    manifest, directory = registry.resolve(version)
    serve = settings.serve
    if serve.backend == "onnx":
        classifier: TextClassifier = OnnxTextClassifier.from_version(
            manifest, directory, serve.execution_provider, serve.intra_op_threads
        )
    else:
        try:
            eager = importlib.import_module(EAGER_BACKEND)
        except ImportError as exc:
            raise RuntimeError(f"serve.backend=torch needs the train extra installed ({exc})") from exc
        classifier = eager.EagerTextClassifier.from_version(manifest, directory, settings)
    classifier.predict(["warm-up"])  # first run allocates buffers; keep that off the first user request
    return LiveModel(manifest.version, manifest, classifier, serve.backend)
