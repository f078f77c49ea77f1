"""A version's drift reference: what its served model made of its validation set, captured at publish.

The exporter writes it (`reference.npz`, hashed in the manifest like every other file) from the
int8 ONNX session that will be served, so live traffic is compared with the same model's view
of data it was validated on. The controller reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneloop.inference import Scores

REFERENCE_FILE = "reference.npz"


@dataclass(frozen=True)
class Reference:
    labels: list[str]
    confidence: np.ndarray  # (n,) top-class probability
    predicted: np.ndarray  # (n,) index into labels
    truth: np.ndarray  # (n,) index into labels
    sketch: np.ndarray  # (n, sketch_dim)
    tokens: np.ndarray  # (n,)
    unknown_tokens: np.ndarray  # (n,)
    abstain_below: float | None = None  # the version's abstain threshold: the abstention-rate signal's line

    @classmethod
    def from_scores(cls, scores: Scores, true_labels: list[str], labels: list[str]) -> Reference:
        if scores.tokens is None or scores.unknown_tokens is None:
            raise ValueError("a drift reference needs token counts; score it with the ONNX classifier")
        index = {name: i for i, name in enumerate(labels)}
        return cls(
            labels=labels,
            confidence=scores.probabilities.max(axis=1).astype(np.float32),
            predicted=scores.probabilities.argmax(axis=1).astype(np.int32),
            truth=np.array([index[label] for label in true_labels], dtype=np.int32),
            sketch=scores.sketch.astype(np.float32),
            tokens=np.asarray(scores.tokens, dtype=np.int32),
            unknown_tokens=np.asarray(scores.unknown_tokens, dtype=np.int32),
        )

    @property
    def predicted_labels(self) -> list[str]:
        return [self.labels[i] for i in self.predicted]

    @property
    def true_labels(self) -> list[str]:
        return [self.labels[i] for i in self.truth]

    @property
    def unknown_rate(self) -> float:
        return float(self.unknown_tokens.sum() / max(int(self.tokens.sum()), 1))

    def save(self, path: Path) -> None:
        arrays = {name: getattr(self, name) for name in ("confidence", "predicted", "truth", "sketch", "tokens", "unknown_tokens")}
        threshold = np.nan if self.abstain_below is None else self.abstain_below
        with path.open("wb") as out:
            np.savez(out, abstain_below=np.array(threshold), **arrays)

    @classmethod
    def load(cls, path: Path, labels: list[str]) -> Reference:
        with np.load(path) as arrays:
            fields = {name: arrays[name] for name in arrays.files if name != "abstain_below"}
            threshold = float(arrays["abstain_below"]) if "abstain_below" in arrays.files else np.nan  # older files
        return cls(labels=labels, abstain_below=None if np.isnan(threshold) else threshold, **fields)
