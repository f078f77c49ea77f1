"""One readable LoRA fine-tuning loop with early stopping on validation loss."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from trainer.data import LabelledTexts
from tuneloop.config import TrainConfig


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    model: PeftModel
    device: str
    epochs: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    train_samples_per_second: float = 0.0

    @property
    def best(self) -> EpochStats:
        return self.epochs[self.best_epoch - 1]


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use 'auto' or 'cpu'.")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _batches(
    tokenizer: PreTrainedTokenizerBase, max_length: int, label_index: dict[str, int]
) -> Callable[[list[tuple[str, str]]], dict[str, torch.Tensor]]:
    def collate(rows: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*rows, strict=True)
        # Dynamic padding: each batch is padded only to its own longest text.
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([label_index[label] for label in labels]),
        }

    return collate


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: PeftModel, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device):
            logits, _ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        total_loss += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        correct += (logits.argmax(dim=-1) == batch["labels"]).sum().item()
        count += len(batch["labels"])
    return total_loss / count, correct / count


def fit(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train: LabelledTexts,
    val: LabelledTexts,
    labels: list[str],
    config: TrainConfig,
    max_length: int,
    progress: bool = True,
    head_learning_rate: float | None = None,
) -> TrainResult:
    """Train until validation loss stops improving; return the model holding its best weights."""
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    model.to(device)
    label_index = {label: i for i, label in enumerate(labels)}
    collate = _batches(tokenizer, max_length, label_index)
    train_loader = DataLoader(
        list(zip(train.texts, train.labels, strict=True)),
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_loader = DataLoader(
        list(zip(val.texts, val.labels, strict=True)), batch_size=config.batch_size * 4, collate_fn=collate
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    # The head may learn at its own rate: when fine-tuning, new intents need a fast head while the
    # encoder's adapter moves slowly, keeping what it knew.
    groups = [{"params": adapter}, {"params": head, "lr": head_learning_rate or config.learning_rate}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.max_epochs * len(train_loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * total_steps), total_steps)

    result = TrainResult(model=model, device=str(device))
    best_loss, best_state, stale = math.inf, None, 0
    samples, train_seconds = 0, 0.0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        started = time.perf_counter()
        losses = []
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.max_epochs}", unit="batch",
                   disable=None if progress else True)  # None: no bar when the log is a file (a run log)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device):
                logits, _ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = F.cross_entropy(logits.float(), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            samples += len(batch["labels"])
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        train_seconds += time.perf_counter() - started
        val_loss, val_accuracy = evaluate(model, val_loader, device)
        stats = EpochStats(epoch, float(np.mean(losses)), val_loss, val_accuracy, time.perf_counter() - started)
        result.epochs.append(stats)
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {stats.train_loss:.4f}  val loss {val_loss:.4f}  val acc {val_accuracy:.3f}")
        if val_loss < best_loss - 1e-4:
            best_loss, stale, result.best_epoch = val_loss, 0, epoch
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            stale += 1
            if stale >= config.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state, strict=False)
    model.eval()
    result.train_samples_per_second = samples / train_seconds if train_seconds else 0.0
    return result
