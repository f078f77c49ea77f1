from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trainer.model import (
    BUNDLED_BASE_ID,
    SentenceClassifier,
    add_lora,
    build_classifier,
    continue_adapter,
    resolve_base,
)
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


def test_a_continued_adapter_keeps_its_weights_and_takes_the_dropout_configured_now(tmp_path: Path) -> None:
    config = ModelConfig()
    base = resolve_base(config)
    trained = add_lora(build_classifier(base, 4, config), TrainConfig(lora_r=4, lora_dropout=0.1))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: B is no longer zero
    trained.save_pretrained(tmp_path)

    def dropouts(model: torch.nn.Module) -> set[float]:
        return {getattr(module, "p", 0.0) for name, module in model.named_modules() if name.endswith("lora_dropout.default")}

    assert dropouts(trained) == {0.1}
    continued = continue_adapter(build_classifier(base, 4, config), tmp_path, TrainConfig(lora_dropout=0.0))
    assert dropouts(continued) == {0.0}  # an Identity: no random masks drawn
    saved = {name: p for name, p in trained.named_parameters() if "lora_" in name}
    loaded = {name: p for name, p in continued.named_parameters() if "lora_" in name}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    assert all(p.requires_grad for p in loaded.values())
