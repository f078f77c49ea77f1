"""One readable LoRA fine-tuning loop with early stopping on validation loss."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from trainer.data import LabelledTexts
from trainer.dropout import swap_dropout
from trainer.frozen_prefix import FrozenPrefix
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
    precision: str = "fp32"  # of the matrix products: "bf16" (autocast) or "fp32"
    epochs: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    train_samples_per_second: float = 0.0
    planned_epochs: int = 0  # the epochs the planned steps reach into (the last may be a part-epoch)
    planned_steps: int = 0  # what the learning-rate schedule ran down over: max_epochs' steps, or fewer to fit a budget
    steps: int = 0  # optimizer steps taken (fewer than planned when early stopping ended the run)
    seconds: float = 0.0  # the whole fit: frozen-layer pass, epochs and their validation
    imprinted_labels: list[str] = field(default_factory=list)  # head rows set from their texts before training

    @property
    def best(self) -> EpochStats:
        return self.epochs[self.best_epoch - 1]


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use 'auto' or 'cpu'.")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


# One core's bf16 products against fp32's. A step is more than its products (casts, softmax, the optimizer): on an
# AMD EPYC with AVX-512 bf16, products 2.1x as fast on one core made whole steps 1.16-1.24x as fast; a CPU that
# emulates bf16 multiplies it slower than fp32.
BF16_SPEEDUP_NEEDED = 1.5


def pick_precision(preference: str, device: torch.device) -> torch.dtype | None:
    """The dtype a run's forward passes autocast to, or None for fp32 (`train.precision`)."""
    if preference == "fp32":
        return None
    if preference == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bf16_speedup() >= BF16_SPEEDUP_NEEDED else None


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster one core of this CPU multiplies bf16 than fp32 matrices of a training step's shape.

    One thread, so that a neighbour on the other cores (the service beside the trainer) does not decide: on 2
    cores a loaded host read 2.3-4.4 where the quiet one read 5.6, and one core reads 2.1 either way. The two
    take turns, 8 rounds, and each keeps its fastest, so that a busy moment during one does not decide either."""
    operands = {dtype: (torch.randn(256, 384).to(dtype), torch.randn(384, 1536).to(dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    fastest = dict.fromkeys(operands, math.inf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a, b in operands.values():
            a @ b  # the first product sets up the kernel
        for _ in range(8):
            for dtype, (a, b) in operands.items():
                started = time.perf_counter()
                for _ in range(4):
                    a @ b
                fastest[dtype] = min(fastest[dtype], time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return fastest[torch.float32] / fastest[torch.bfloat16]


@dataclass(frozen=True)
class Encoded:
    """Texts tokenized once per run (no padding), their label indices, and the frozen layers' output if any."""

    ids: list[list[int]]
    labels: torch.Tensor
    prefix: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def by_length(self) -> list[int]:
        """Row indices, shortest text first: batches cut from them pad little."""
        return sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))

    def shuffled_batches(self, batch_size: int, generator: torch.Generator, group_by_length: bool) -> list[list[int]]:
        """One epoch's batches in random order. Grouped by length, each batch is cut from a shuffled window of
        50 batches sorted by length, so it pads little while every window still mixes the data (as
        transformers' `group_by_length`): on BANKING77 random batches of 16 pad to 2.4 times the real tokens."""
        order = torch.randperm(len(self.ids), generator=generator).tolist()
        if group_by_length:
            window = 50 * batch_size
            order = [i for start in range(0, len(order), window)
                     for i in sorted(order[start : start + window], key=lambda i: len(self.ids[i]))]
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def encode(tokenizer: PreTrainedTokenizerBase, data: LabelledTexts, labels: list[str], max_length: int) -> Encoded:
    index = {label: i for i, label in enumerate(labels)}
    ids = tokenizer(list(data.texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, torch.tensor([index[label] for label in data.labels]))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Dynamic padding: each batch is padded only to its own longest text.
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def with_prefix(data: Encoded, prefix: FrozenPrefix, pad_id: int, device: torch.device, batch_size: int = 64) -> Encoded:
    """The frozen layers' output for every text, computed once, in batches of similar length."""
    order = data.by_length()
    hidden: list[torch.Tensor | None] = [None] * len(data)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = _pad([data.ids[i] for i in chunk], pad_id)
        out = prefix.compute(ids.to(device), mask.to(device)).float().cpu()
        for row, i in enumerate(chunk):
            hidden[i] = out[row, : len(data.ids[i])]
    return Encoded(data.ids, data.labels, hidden)  # type: ignore[arg-type]


def _batch(data: Encoded, indices: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids, mask = _pad([data.ids[i] for i in indices], pad_id)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": data.labels[indices].to(device)}
    if data.prefix is not None:
        hidden = torch.zeros((len(indices), ids.shape[1], data.prefix[indices[0]].shape[-1]))
        for row, i in enumerate(indices):
            hidden[row, : len(data.ids[i])] = data.prefix[i]
        batch["prefix"] = hidden.to(device)
    return batch


def _forward(model: PeftModel, batch: dict[str, torch.Tensor], prefix: FrozenPrefix | None,
             dtype: torch.dtype | None) -> torch.Tensor:
    feeding = prefix.feeding(batch["prefix"]) if prefix is not None else contextlib.nullcontext()
    device = batch["input_ids"].device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with feeding, autocast:
        logits, _ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return logits.float()


class LinearSchedule:
    """Warm up over the first 6 % of the steps, then decay linearly to zero at the last (as transformers'
    get_linear_schedule_with_warmup). A budgeted run re-plans its length as its steps show how many fit
    (`replan`): the rate goes on from where it is, without a jump, to zero at the new last step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        self.warmup = math.ceil(0.06 * total_steps)
        self.knots = ([0, self.warmup, total_steps], [0.0, 1.0, 0.0])  # (step, factor) points, linear between
        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)

    def factor(self, step: int) -> float:
        return float(np.interp(step, *self.knots))

    def replan(self, total_steps: int) -> None:
        now = self.lambda_lr.last_epoch  # steps taken; the next one runs at factor(now)
        rate = self.factor(now)
        warmup = max(math.ceil(0.06 * total_steps), now + 1)  # a warm-up under way still reaches the full rate
        if now < self.warmup and warmup < total_steps:
            self.warmup, self.knots = warmup, ([now, warmup, total_steps], [rate, 1.0, 0.0])
        else:
            self.knots = ([now, total_steps], [rate, 0.0])

    def step(self) -> None:
        self.lambda_lr.step()


REPLAN_EVERY = 20  # steps between a budgeted run's plans of its length


def steps_within(budget_s: float, elapsed_s: float, step_s: float, validate_s: float, done: int,
                 steps_per_epoch: int, most: int) -> int:
    """How many steps a run can have in all, `done` of them (and what came before) taking `elapsed_s`, each next
    step about `step_s`, a validation about `validate_s` at every epoch's end and at the run's end; at most
    `most`, at least `done`."""
    left = budget_s - elapsed_s - validate_s  # the run's own last validation
    step_s = max(step_s, 1e-9)
    total = done
    while total < most:
        epoch_end = min(most, (total // steps_per_epoch + 1) * steps_per_epoch)
        affordable = math.floor(left / step_s)
        if affordable < epoch_end - total:
            return total + max(0, affordable)  # the run ends inside this epoch
        left -= (epoch_end - total) * step_s
        total = epoch_end
        if total < most and left < validate_s + step_s:  # going on past an epoch's end costs its validation
            break
        left -= validate_s
    return total


@torch.no_grad()
def evaluate(model: PeftModel, data: Encoded, pad_id: int, device: torch.device, prefix: FrozenPrefix | None = None,
             dtype: torch.dtype | None = None, batch_size: int = 64) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    order = data.by_length()  # the sums do not depend on the order, the padding does
    for start in range(0, len(data), batch_size):
        batch = _batch(data, order[start : start + batch_size], pad_id, device)
        logits = _forward(model, batch, prefix, dtype)
        total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(dim=-1) == batch["labels"]).sum().item()
    return total_loss / len(data), correct / len(data)


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
    frozen_layers: int = 0,
    time_budget_s: float = 0.0,
    budget_from: float | None = None,
) -> TrainResult:
    """Train until validation loss stops improving; return the model holding its best weights.

    With `frozen_layers`, the encoder's lower layers stay fixed and their output is computed once
    (trainer/frozen_prefix.py); only the layers above and the head train. With `time_budget_s`, counted from
    `budget_from` (a `time.perf_counter()` value, the run's start; default: now), the speed measured every 20 steps
    and at each validation decides how many steps fit the budget (at most max_epochs' worth), and the learning rate
    runs down over those: a slow or busy host, or a large batch of feedback, trains fewer steps to a finished
    schedule, ending inside an epoch if need be, rather than overrunning the loop.
    """
    torch.manual_seed(config.seed)
    fit_started = time.perf_counter()
    budget_from = fit_started if budget_from is None else budget_from
    device = pick_device(config.device)
    dtype = pick_precision(config.precision, device)
    model.to(device)
    swap_dropout(model)  # the same masks, drawn at an eighth of the cost
    pad_id = tokenizer.pad_token_id
    train_set, val_set = (encode(tokenizer, part, labels, max_length) for part in (train, val))
    prefix = FrozenPrefix(model, frozen_layers) if frozen_layers else None
    started = time.perf_counter()
    if prefix is not None:
        train_set, val_set = (with_prefix(part, prefix, pad_id, device) for part in (train_set, val_set))
    prefix_seconds = time.perf_counter() - started
    shuffling = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    # The head may learn at its own rate: when fine-tuning, new intents need a fast head while the
    # encoder's adapter moves slowly, keeping what it knew.
    groups = [{"params": adapter}, {"params": head, "lr": head_learning_rate or config.learning_rate}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    most = config.max_epochs * steps_per_epoch
    scheduler = LinearSchedule(optimizer, most)
    result = TrainResult(model=model, device=str(device), precision="bf16" if dtype else "fp32",
                         planned_epochs=config.max_epochs, planned_steps=most)
    best_loss, best_state, stale = math.inf, None, 0
    samples, validate_s = 0, 0.0
    stepping_s = 0.0  # time in optimizer steps alone (no validation, no frozen-layer pass): what a step costs

    def replan(stepped_s: float) -> None:
        """Fit the rest of the run into the budget at the speed measured so far (longer or shorter than planned)."""
        step_s = stepped_s / result.steps
        validating_s = validate_s or step_s * len(val_set) / config.batch_size / 3  # before one ran: forward only
        elapsed = time.perf_counter() - budget_from
        planned = steps_within(time_budget_s, elapsed, step_s, validating_s, result.steps, steps_per_epoch, most)
        if planned != result.planned_steps:
            scheduler.replan(planned)
            result.planned_steps, result.planned_epochs = planned, math.ceil(planned / steps_per_epoch)
            if progress:
                tqdm.write(f"time budget {time_budget_s:.0f} s: {planned} steps, {planned / steps_per_epoch:.1f} epochs "
                           f"in all ({elapsed:.0f} s so far, {step_s:.2f} s a step)")

    epoch = 0
    while result.steps < result.planned_steps:
        epoch += 1
        model.train()
        started = time.perf_counter()
        losses = []
        batches = train_set.shuffled_batches(config.batch_size, shuffling, config.group_by_length)
        bar = tqdm(batches, desc=f"epoch {epoch}/{result.planned_epochs}", unit="batch",
                   disable=None if progress else True)  # None: no bar when the log is a file (a run log)
        for indices in bar:
            batch = _batch(train_set, indices, pad_id, device)
            loss = F.cross_entropy(_forward(model, batch, prefix, dtype), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            samples += len(batch["labels"])
            result.steps += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if time_budget_s and result.steps % REPLAN_EVERY == 0:  # the host's load may change within an epoch
                replan(stepping_s + time.perf_counter() - started)
            if result.steps >= result.planned_steps:  # the budget may end the run inside an epoch
                break
        bar.close()
        stepping_s += time.perf_counter() - started
        validation_started = time.perf_counter()
        val_loss, val_accuracy = evaluate(model, val_set, pad_id, device, prefix, dtype)
        validate_s = time.perf_counter() - validation_started
        stats = EpochStats(epoch, float(np.mean(losses)), val_loss, val_accuracy, time.perf_counter() - started)
        result.epochs.append(stats)
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {stats.train_loss:.4f}  val loss {val_loss:.4f}  val acc {val_accuracy:.3f}")
        if time_budget_s and result.steps < result.planned_steps:
            replan(stepping_s)
        if val_loss < best_loss - 1e-4:
            best_loss, stale, result.best_epoch = val_loss, 0, epoch
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            stale += 1
            if stale >= config.patience:
                break
    if prefix is not None:
        prefix.close()
    assert best_state is not None
    model.load_state_dict(best_state, strict=False)
    model.eval()
    train_seconds = prefix_seconds + stepping_s  # the frozen-layer pass is part of training
    result.train_samples_per_second = samples / train_seconds if train_seconds else 0.0
    result.seconds = time.perf_counter() - fit_started
    return result
