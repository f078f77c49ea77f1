"""A published version run as PyTorch eager: the service's `serve.backend=torch` switch, for benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.model import load_adapted, load_tokenizer, predict, resolve_base
from tuneloop.config import Settings
from tuneloop.confidence import softmax
from tuneloop.inference import Scores
from tuneloop.registry import Manifest


class EagerTextClassifier:
    def __init__(self, model: torch.nn.Module, tokenizer: object, max_length: int, temperature: float = 1.0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.temperature = temperature

    @classmethod
    def from_version(cls, manifest: Manifest, directory: Path, settings: Settings) -> EagerTextClassifier:
        base = resolve_base(settings.model)
        model = load_adapted(base, directory / "adapter", len(manifest.labels), settings.model)
        if settings.serve.intra_op_threads:
            torch.set_num_threads(settings.serve.intra_op_threads)
        return cls(model.merge_and_unload().eval(), load_tokenizer(base), int(manifest.export["max_seq_length"]),
                   manifest.temperature)

    def predict(self, texts: list[str]) -> Scores:
        logits, sketch = predict(self.model, self.tokenizer, texts, self.max_length, batch_size=max(len(texts), 1))
        return Scores(logits=logits, probabilities=softmax(logits, self.temperature), sketch=sketch)
