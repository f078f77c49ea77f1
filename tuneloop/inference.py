"""Run a published version: `tokenizers` for text, ONNX Runtime for the model. No torch.

The exporter validates candidates through this class and the service serves through
it, so what is gated is exactly what is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from tuneloop.registry import Manifest


@dataclass(frozen=True)
class Scores:
    logits: np.ndarray  # (n, labels)
    probabilities: np.ndarray  # (n, labels)
    sketch: np.ndarray  # (n, sketch_dim)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def load_tokenizer(path: Path, max_length: int, pad_token: str) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"{path}: pad token {pad_token!r} is not in the vocabulary")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def choose_providers(preference: str) -> list[str]:
    """CUDA when asked for or when `auto` finds onnxruntime-gpu with a device; CPU always as fallback."""
    available = ort.get_available_providers()
    if preference == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "serve.execution_provider=cuda but ONNX Runtime has no CUDAExecutionProvider; "
            "install the gpu extra (onnxruntime-gpu) or use 'auto'."
        )
    if preference in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxTextClassifier:
    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        labels: list[str],
        max_length: int,
        pad_token: str,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(tokenizer_path, max_length, pad_token)
        self.labels = labels
        self.input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in outputs:
            raise ValueError(f"{model_path}: the graph has no 'logits' output (outputs: {outputs})")
        self.output_names = [name for name in ("logits", "sketch") if name in outputs]

    @classmethod
    def from_version(
        cls, manifest: Manifest, directory: Path, execution_provider: str = "auto", intra_op_threads: int = 0
    ) -> OnnxTextClassifier:
        export = manifest.export
        return cls(
            directory / "model.onnx",
            directory / "tokenizer.json",
            manifest.labels,
            max_length=int(export["max_seq_length"]),
            pad_token=str(export["pad_token"]),
            providers=choose_providers(execution_provider),
            intra_op_threads=intra_op_threads,
        )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        return {name: value for name, value in feeds.items() if name in self.input_names}

    def predict(self, texts: list[str]) -> Scores:
        if not texts:
            raise ValueError("predict needs at least one text")
        outputs = self.session.run(self.output_names, self.encode(texts))
        logits = outputs[0].astype(np.float32)
        sketch = outputs[1] if len(outputs) > 1 else np.zeros((len(texts), 0), dtype=np.float32)
        return Scores(logits=logits, probabilities=softmax(logits), sketch=sketch)
