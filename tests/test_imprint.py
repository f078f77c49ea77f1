"""trainer/imprint.py: the head rows of labels a version never learned start from their rows' mean embedding."""

from __future__ import annotations

import torch

from trainer import scenario
from trainer.imprint import imprint_new_labels, trainable_head
from trainer.model import add_lora, build_classifier, load_tokenizer, predict, resolve_base
from tuneloop.config import ModelConfig, TrainConfig

KNOWN, NEW, UNSEEN = ("banking",), ("utility",), ("travel",)  # UNSEEN: declared, no text of it yet


def test_imprinted_rows_recognise_their_labels_and_leave_the_known_rows_alone() -> None:
    labels = scenario.domain_labels(KNOWN + NEW + UNSEEN)
    new_labels, known_labels = scenario.domain_labels(NEW), scenario.domain_labels(KNOWN)
    base, model_config = resolve_base(ModelConfig()), ModelConfig()
    model = add_lora(build_classifier(base, len(labels), model_config), TrainConfig())
    tokenizer = load_tokenizer(base)
    head = trainable_head(model)
    new_rows = [labels.index(label) for label in new_labels]
    known_rows = [labels.index(label) for label in known_labels]
    with torch.no_grad():  # what bootstrap leaves for labels it never saw a text of: rows trained to lose
        head.bias[[i for i in range(len(labels)) if i not in known_rows]] = -8.0
    before = head.weight.detach().clone(), head.bias.detach().clone()
    untouched = [i for i in range(len(labels)) if i not in new_rows]

    feedback = scenario.sample(NEW, "train", per_label=8, seed=1)
    model.train()
    imprinted = imprint_new_labels(model, tokenizer, feedback, labels, new_labels, known_labels, max_length=64)
    assert sorted(imprinted) == sorted(new_labels)  # every new label had rows
    assert model.get_base_model().dropout.training  # embeddings taken in eval mode (no dropout); training mode back

    assert torch.equal(head.weight[untouched], before[0][untouched])  # known rows, and the declared-but-unseen
    assert torch.equal(head.bias[untouched], before[1][untouched])
    # The known rows' mean bias, not one pulled down by the unseen label's -8.
    assert torch.allclose(head.bias[new_rows], before[1][known_rows].mean().expand(len(new_rows)))
    known_norm = before[0][known_rows].norm(dim=1).mean()
    assert torch.allclose(head.weight[new_rows].norm(dim=1), known_norm.expand(len(new_rows)), rtol=1e-4)

    # Texts the imprint never read: each new row now points at its own intent (15 intents, chance 1 in 15).
    test = scenario.sample(NEW, "test", per_label=10, seed=3)
    logits, _ = predict(model, tokenizer, test.texts, max_length=64)
    among_new = logits[:, new_rows].argmax(axis=1)
    accuracy = sum(new_labels[i] == label for i, label in zip(among_new, test.labels, strict=True)) / len(test)
    assert accuracy > 0.6, accuracy


def test_nothing_new_changes_nothing() -> None:
    base, model_config = resolve_base(ModelConfig()), ModelConfig()
    model = add_lora(build_classifier(base, 3, model_config), TrainConfig())
    head = trainable_head(model)
    before = head.weight.detach().clone()
    model.train()
    imprinted = imprint_new_labels(model, load_tokenizer(base), scenario.sample(NEW, "train", 2, 1), ["a", "b", "c"], [], ["a"], 64)
    assert imprinted == [] and torch.equal(head.weight, before) and model.training
