"""Head rows for labels the live version never trained on, imprinted from their feedback before a run trains.

A version bootstrapped with every label declared has a head row for each, but for a label it never saw a
text of, training only ever pushed that row's logit down. Fine-tuning from there spends its first epochs
lifting those rows before they can compete. Instead, each such label's row starts as the direction of its
training rows' mean sentence embedding, scaled to the known rows' mean norm, with the known rows' mean bias:
the imprinted weights of low-shot learning (Qi, Brown and Lowe, CVPR 2018). With a run's few epochs that
is worth 1-3 points on the new labels and nothing on the old (README, "How the fine-tuning defaults were
chosen").
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer.data import LabelledTexts
from trainer.model import unwrapped

ROWS_PER_LABEL = 64  # a prototype's mean settles long before; bounds the pass on large feedback sets
BATCH_SIZE = 64


def trainable_head(model: nn.Module) -> nn.Linear:
    """The head that trains: the classifier's Linear whose weights take gradients (peft keeps a frozen original)."""
    heads = [m for m in unwrapped(model).classifier.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if len(heads) != 1:
        raise ValueError(f"expected one trainable head, found {len(heads)}")
    return heads[0]


@torch.no_grad()
def imprint_new_labels(model: nn.Module, tokenizer: PreTrainedTokenizerBase, train: LabelledTexts,
                       labels: list[str], new_labels: list[str], known_labels: list[str], max_length: int) -> list[str]:
    """Set the head rows of `new_labels` (labels with training rows the model has not learned) from their rows,
    at the mean norm and bias of the `known_labels`' rows (those it learned; a declared label it has seen no
    text of yet is neither). Returns the labels imprinted."""
    index = {label: i for i, label in enumerate(labels)}
    known = [index[label] for label in known_labels if label not in new_labels]
    if not new_labels or not known:  # nothing to imprint, or nothing learned to scale it to
        return []
    head = trainable_head(model)
    inner = unwrapped(model)
    rows: list[tuple[str, int]] = []
    for label in new_labels:
        texts = [t for t, lab in zip(train.texts, train.labels, strict=True) if lab == label][:ROWS_PER_LABEL]
        rows += [(text, index[label]) for text in texts]
    rows.sort(key=lambda row: len(row[0]))  # batches of similar length pad little
    device = head.weight.device
    sums = torch.zeros_like(head.weight)
    counts = torch.zeros(len(labels), device=device)
    was_training = inner.training
    inner.eval()
    try:
        for start in range(0, len(rows), BATCH_SIZE):
            texts, targets = zip(*rows[start : start + BATCH_SIZE], strict=True)
            encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            pooled = inner.embed(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
            target = torch.tensor(targets, device=device)
            sums.index_add_(0, target, pooled.to(sums.dtype))
            counts.index_add_(0, target, torch.ones_like(target, dtype=counts.dtype))
    finally:
        inner.train(was_training)
    new = counts > 0
    prototypes = sums[new] / counts[new].unsqueeze(1)
    scale = head.weight[known].norm(dim=1).mean()
    head.weight[new] = prototypes / prototypes.norm(dim=1, keepdim=True).clamp(min=1e-9) * scale
    head.bias[new] = head.bias[known].mean()
    return [labels[i] for i in new.nonzero().flatten().tolist()]
