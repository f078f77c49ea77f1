"""The model a replica serves: a verified registry version behind one inference backend.

Backends are chosen by `serve.backend` from a registered list (`BACKENDS`): name -> loader.
ONNX Runtime is the serving backend. Other packages add backends under the `tuneloop.backends`
entry-point group (pyproject.toml): the trainer registers `torch`, the PyTorch-eager backend, which
needs torch and the train extra. An entry point is loaded when first chosen, so the serving path
never imports torch and `services/` imports nothing from the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Protocol

from tuneloop.config import BACKEND_ENTRY_POINTS, Settings
from tuneloop.inference import OnnxTextClassifier, Scores
from tuneloop.registry import Manifest, Registry

log = logging.getLogger("tuneloop.service")


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
    abstain_below: float | None = None  # a text whose top score is lower is answered `label: null`
    out_of_scope: str | None = None  # a declared label predicted as `label: null` (serve.out_of_scope_label)


def served_threshold(setting: float | str | None, manifest: Manifest) -> float | None:
    """`serve.abstain_below` for one version: a probability, the version's own threshold ('version'), or None."""
    if setting != "version":
        return setting  # type: ignore[return-value]
    if manifest.abstain_below is None:
        log.warning("serve.abstain_below is 'version' but v%d has no abstain threshold (exported before calibration, "
                    "or too few held-out rows to choose one): it answers every text; set a probability to abstain",
                    manifest.version)
    return manifest.abstain_below


def _onnx(manifest: Manifest, directory: Path, settings: Settings) -> TextClassifier:
    serve = settings.serve
    return OnnxTextClassifier.from_version(manifest, directory, serve.execution_provider, serve.intra_op_threads)


@dataclass(frozen=True)
class Plugin:
    """A backend another package registers as an entry point (a class with `from_version`), loaded when first chosen."""

    entry_point: EntryPoint

    def __call__(self, manifest: Manifest, directory: Path, settings: Settings) -> TextClassifier:
        try:
            backend = self.entry_point.load()
        except ImportError as exc:
            raise RuntimeError(
                f"serve.backend={self.entry_point.name} cannot be imported ({exc}); install what "
                f"{self.entry_point.value} needs (for torch: pip install 'tuneloop[train]')"
            ) from exc
        return backend.from_version(manifest, directory, settings)


BACKENDS: dict[str, Loader] = {"onnx": _onnx} | {ep.name: Plugin(ep) for ep in entry_points(group=BACKEND_ENTRY_POINTS)}


def load_live_model(registry: Registry, settings: Settings, version: int | None = None) -> LiveModel:
    """Verify every file of a version (default: the live one), build its backend and warm it up."""
    manifest, directory = registry.resolve(version, servable=True)
    backend = settings.serve.backend
    try:
        loader = BACKENDS[backend]
    except KeyError:
        raise RuntimeError(f"serve.backend={backend} is not one of {sorted(BACKENDS)}") from None
    classifier = loader(manifest, directory, settings)
    classifier.predict(["warm-up"])  # first run allocates buffers; keep that off the first user request
    out_of_scope = settings.serve.out_of_scope_label
    return LiveModel(manifest.version, manifest, classifier, backend,
                     served_threshold(settings.serve.abstain_below, manifest),
                     out_of_scope if out_of_scope in manifest.labels else None)
