"""Merge the LoRA adapter, export ONNX with dynamic axes, and apply the BERT graph optimizer."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnxruntime.transformers.optimizer import optimize_model
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["logits", "sketch"]


def merge(model: PeftModel) -> nn.Module:
    """Fold LoRA weights into the encoder; the result is a plain module with no peft layers."""
    return model.merge_and_unload().eval()


def export(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, opset: int) -> None:
    model = model.to("cpu").eval()
    sample = tokenizer(
        ["a short example", "a second and somewhat longer example sentence"], padding=True, return_tensors="pt"
    )
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    axes |= {"logits": {0: "batch"}, "sketch": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter warns about its own deprecation and traced branches
        # The TorchScript exporter: ONNX Runtime's BERT fusions recognise its attention graph, not dynamo's.
        torch.onnx.export(
            model,
            (sample["input_ids"], sample["attention_mask"]),
            str(path),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


def optimize(source: Path, target: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse attention, layer norm and GELU; return the fused-operator counts for the manifest."""
    optimized = optimize_model(str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(str(target))
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    log.info("graph optimizer fused: %s", fused)
    return fused
