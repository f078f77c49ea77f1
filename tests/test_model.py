from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trainer.model import BUNDLED_BASE_ID, SentenceClassifier, add_lora, build_classifier, resolve_base
from tuneloop.config import ModelConfig, TrainConfig


def test_default_base_is_the_bundled_minilm() -> None:
    base = resolve_base(ModelConfig())
    assert base.model_id == BUNDLED_BASE_ID
    assert (base.path / "config.json").is_file()


def test_any_local_encoder_directory_works_through_model_base(tmp_path: Path) -> None:
    copy = tmp_path / "my-encoder"
    shutil.copytree(resolve_base(ModelConfig()).path, copy)
    config = ModelConfig(base=str(copy))
    base = resolve_base(config)
    assert base.path == copy and base.model_id == str(copy)
    model = build_classifier(base, num_labels=3, model_config=config)
    logits, sketch = model(torch.tensor([[101, 7592, 102]]), torch.tensor([[1, 1, 1]]))
    assert logits.shape == (1, 3) and sketch.shape == (1, config.sketch_dim)


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face encoder directory"):
        resolve_base(ModelConfig(base=str(tmp_path)))


def test_lora_trains_adapters_and_the_new_head_only() -> None:
    config = ModelConfig()
    model = add_lora(build_classifier(resolve_base(config), 4, config), TrainConfig(lora_r=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    assert any("classifier" in name for name in trainable)
    assert any("query.lora_A" in name for name in trainable)
    assert isinstance(model.get_base_model(), SentenceClassifier)
