"""Run a published version: `tokenizers` for text, ONNX Runtime for the model. No torch.

The exporter validates candidates through this class and the service serves through
it, so what is gated is exactly what is served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from tuneloop.confidence import softmax
from tuneloop.registry import Manifest


@dataclass(frozen=True)
class Scores:
    logits: np.ndarray  # (n, labels)
    probabilities: np.ndarray  # (n, labels)
    sketch: np.ndarray  # (n, sketch_dim)
    tokens: np.ndarray | None = None  # (n,) tokens per text after truncation
    unknown_tokens: np.ndarray | None = None  # (n,) of those, how many the vocabulary mapped to the unknown token


def unknown_token_id(tokenizer: Tokenizer) -> int | None:
    """The id the vocabulary gives words it cannot represent (WordPiece's [UNK]), if it has one."""
    unknown = json.loads(tokenizer.to_str())["model"].get("unk_token")
    return tokenizer.token_to_id(unknown) if unknown else None


def load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """Truncating, non-padding tokenizer: padding is applied per length group at run time."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
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
        max_padding_waste: float = 0.5,
        max_rows_per_run: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(tokenizer_path, max_length)
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{tokenizer_path}: pad token {pad_token!r} is not in the vocabulary")
        self.pad_id = pad_id
        self.unknown_id = unknown_token_id(self.tokenizer)
        self.max_padding_waste = max_padding_waste
        # Dynamic int8 picks one activation scale per tensor, so a row's scores would depend on its
        # batch neighbours (measured: 2-6 label flips per 1,000 texts); such graphs run one row at a time.
        self.max_rows_per_run = max_rows_per_run
        self.labels = labels
        self.temperature = temperature  # probabilities are softmax(logits / temperature): tuneloop/confidence.py
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
            max_rows_per_run=export.get("max_rows_per_run"),
            temperature=manifest.temperature,
        )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def predict(self, texts: list[str]) -> Scores:
        """Score texts. They run in groups of similar length, so short texts don't pay for a long one's padding."""
        if not texts:
            raise ValueError("predict needs at least one text")
        encodings = self.tokenizer.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encodings])
        unknown = np.array([e.ids.count(self.unknown_id) for e in encodings]) if self.unknown_id is not None else None
        order = np.argsort(lengths, kind="stable")
        outputs: list[np.ndarray | None] = [None] * len(self.output_names)
        for group in length_groups(lengths[order], self.max_padding_waste, self.max_rows_per_run):
            rows = order[group]
            results = self.session.run(self.output_names, self._feeds([encodings[i].ids for i in rows]))
            for k, result in enumerate(results):
                if outputs[k] is None:
                    outputs[k] = np.empty((len(texts), *result.shape[1:]), dtype=np.float32)
                outputs[k][rows] = result
        logits = outputs[0]
        sketch = outputs[1] if len(outputs) > 1 else np.zeros((len(texts), 0), dtype=np.float32)
        return Scores(logits, softmax(logits, self.temperature), sketch, tokens=lengths, unknown_tokens=unknown)

    def _feeds(self, sequences: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(ids) for ids in sequences)
        input_ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        return {name: value for name, value in feeds.items() if name in self.input_names}


def length_groups(sorted_lengths: np.ndarray, max_padding_waste: float, max_rows: int | None = None) -> list[slice]:
    """Split ascending lengths into runs of at most max_rows whose padded size stays within (1 + waste) x real tokens."""
    groups, start, tokens = [], 0, 0
    for end, length in enumerate(sorted_lengths):
        tokens += int(length)
        too_wasteful = (end - start + 1) * int(length) > (1 + max_padding_waste) * tokens
        if end > start and (too_wasteful or (max_rows is not None and end - start >= max_rows)):
            groups.append(slice(start, end))
            start, tokens = end, int(length)
    groups.append(slice(start, len(sorted_lengths)))
    return groups
