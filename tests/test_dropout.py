from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.dropout import Dropout, swap_dropout
from trainer.model import add_lora, build_classifier, resolve_base
from tuneloop.config import ModelConfig, TrainConfig


def _within_binomial(kept: int, count: int, p_keep: float) -> bool:
    """Kept count within 5 standard deviations of a Binomial(count, p_keep): a wrong rate of 1 % fails at this size."""
    return abs(kept - count * p_keep) <= 5 * math.sqrt(count * p_keep * (1 - p_keep))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_element_is_kept_with_probability_1_minus_p_and_scaled_like_nn_dropout(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(257, 33, 41) + 1.0  # a count that is not a multiple of the four lanes of a draw
    out = Dropout(p).train()(x)
    kept = out != 0
    assert _within_binomial(int(kept.sum()), x.numel(), 1 - p)
    assert torch.allclose(out[kept], x[kept] / (1 - p))
    # Each of a draw's four 16-bit lanes, on its own: a biased lane (say a sign bit that is never set) fails here.
    lanes = kept.flatten()[: x.numel() // 4 * 4].view(-1, 4)
    for lane in range(4):
        assert _within_binomial(int(lanes[:, lane].sum()), lanes.shape[0], 1 - p), f"lane {lane}"


def test_masks_are_independent_between_calls_and_reproducible_from_the_seed() -> None:
    x = torch.ones(64, 512)
    dropout = Dropout(0.1).train()
    torch.manual_seed(7)
    first, second = dropout(x) != 0, dropout(x) != 0
    torch.manual_seed(7)
    assert torch.equal(dropout(x) != 0, first)
    agree = int((first == second).sum())
    assert _within_binomial(agree, x.numel(), 0.9**2 + 0.1**2)  # what two independent masks agree on


def test_outside_training_and_at_p_0_it_is_the_identity() -> None:
    x = torch.randn(8, 16)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        Dropout(1.0)


def test_the_gradient_flows_through_the_kept_elements_only() -> None:
    torch.manual_seed(3)
    x = torch.randn(32, 64, requires_grad=True)
    out = Dropout(0.25).train()(x)
    out.sum().backward()
    assert torch.allclose(x.grad, (out != 0).float() / 0.75)


def test_swapping_a_lora_classifier_replaces_every_nn_dropout_and_keeps_eval_outputs() -> None:
    config = ModelConfig()
    model = add_lora(build_classifier(resolve_base(config), 5, config), TrainConfig(lora_r=4, lora_dropout=0.2))
    before = {name: module.p for name, module in model.named_modules() if isinstance(module, nn.Dropout)}
    ids, mask = torch.tensor([[101, 7592, 2088, 102]]), torch.tensor([[1, 1, 1, 1]])
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask)[0]
    assert swap_dropout(model) == len(before) > 0
    after = {name: module.p for name, module in model.named_modules() if isinstance(module, Dropout)}
    assert after == before  # same places, same p: LoRA's (0.2), the encoder's and the head's (0.1)
    assert 0.2 in after.values() and not any(type(m) is nn.Dropout for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask)[0], expected)
