"""The frozen lower layers computed once (trainer/frozen_prefix.py) give the very same model output."""

from __future__ import annotations

import pytest
import torch

from trainer.frozen_prefix import FrozenPrefix
from trainer.model import add_lora, build_classifier, load_tokenizer, resolve_base
from tuneloop.config import ModelConfig, TrainConfig

TEXTS = ["a short one", "a somewhat longer sentence about booking a flight to Lisbon", "hi"]


@pytest.fixture(scope="module")
def model_and_batch():
    config = ModelConfig()
    base = resolve_base(config)
    model = add_lora(build_classifier(base, 5, config), TrainConfig()).eval()
    with torch.no_grad():  # non-zero LoRA weights, as a warm-started adapter has
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    encoded = load_tokenizer(base)(TEXTS, padding=True, return_tensors="pt")
    return model, encoded["input_ids"], encoded["attention_mask"]


def test_running_the_top_layers_on_the_cached_output_matches_the_whole_model(model_and_batch) -> None:
    model, ids, mask = model_and_batch
    with torch.no_grad():
        whole, whole_sketch = model(input_ids=ids, attention_mask=mask)
        prefix = FrozenPrefix(model, 4)
        try:
            hidden = prefix.compute(ids, mask)
            with prefix.feeding(hidden):
                top, top_sketch = model(input_ids=ids, attention_mask=mask)
        finally:
            prefix.close()
        after, _ = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(top, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top_sketch, whole_sketch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, whole)  # closed: the whole encoder runs again


def test_only_the_layers_above_the_prefix_train(model_and_batch) -> None:
    model, _, _ = model_and_batch
    prefix = FrozenPrefix(model, 4)
    prefix.close()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("classifier" in n or ".layer.4." in n or ".layer.5." in n for n in trainable)
    assert any(".layer.5." in n for n in trainable)


def test_the_prefix_must_leave_a_layer_to_train(model_and_batch) -> None:
    model, _, _ = model_and_batch
    with pytest.raises(ValueError, match="between 1 and 5"):
        FrozenPrefix(model, 6)
