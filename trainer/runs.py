"""A training run as a function: `bootstrap()` trains model v1 on a CSV, `train_on_feedback()` trains a candidate
from the live version on new feedback plus replay. Each returns what it trained and a `Candidate`: the model and
everything export, the gate and publishing need (which rows check parity, capture the drift reference and travel
with the version). Export, gate and publish are not the trainer's: `pipeline/versions.py` ties them together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from trainer import data as datasets
from trainer.data import LabelledTexts, concat
from trainer.finetune import FinetuneData, build_dataset, finetune
from trainer.model import BaseEncoder, add_lora, build_classifier, load_tokenizer, resolve_base
from trainer.train import TrainResult, fit
from tuneloop.config import Settings
from tuneloop.errors import NothingToTrain
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Manifest, Registry

Say = Callable[[str], None]


def quiet(_: str) -> None:
    """A `Say` that says nothing."""


@dataclass(frozen=True)
class Candidate:
    """A trained model and the rows that judge and accompany it."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    base: BaseEncoder
    labels: list[str]
    parity_rows: LabelledTexts  # int8 ONNX vs PyTorch agreement, and the validation accuracies in the manifest
    reference_rows: LabelledTexts  # the drift reference: rows training never saw
    stored: dict[str, LabelledTexts]  # kept with the version as data/<name>.csv: the next run's replay pool, the holdout
    calibration_texts: Sequence[str]  # training rows the static int8 recipe calibrates on
    training: dict[str, Any]  # the manifest's training_data
    parent_version: int | None = None


@dataclass(frozen=True)
class BootstrapRun:
    """Model v1 trained on a CSV's training split."""

    candidate: Candidate
    result: TrainResult
    train: LabelledTexts
    val: LabelledTexts
    holdout: LabelledTexts


@dataclass(frozen=True)
class FeedbackRun:
    """A candidate trained from the live version on new feedback plus replay."""

    candidate: Candidate
    result: TrainResult
    live: Manifest
    live_dir: Path
    data: FinetuneData


def bootstrap(settings: Settings, data: Path, labels: list[str] | None = None, progress: bool = True,
              say: Say = quiet) -> BootstrapRun:
    """Split the CSV (train / validation / holdout), build the classifier with a fresh LoRA adapter and train it.

    Raises DataError when the CSV or the declared labels cannot be used."""
    rows = datasets.load_csv(data)
    label_names = datasets.label_set(rows, labels)
    train_rows, val_rows, holdout = datasets.split3(
        rows, settings.train.val_fraction, settings.train.holdout_fraction, settings.train.seed)
    base = resolve_base(settings.model)
    say(
        f"bootstrap: {len(train_rows)} train / {len(val_rows)} validation / {len(holdout)} holdout rows, "
        f"{len(label_names)} labels, base {base.model_id}"
    )
    tokenizer = load_tokenizer(base)
    model = add_lora(build_classifier(base, len(label_names), settings.model), settings.train)
    result = fit(model, tokenizer, train_rows, val_rows, label_names, settings.train, settings.model.max_seq_length, progress)
    training = rows.source | {
        "split_seed": settings.train.seed,
        "val_fraction": settings.train.val_fraction,
        "holdout_fraction": settings.train.holdout_fraction,
        "train_rows": len(train_rows),
        "device": result.device,
        "precision": result.precision,
        "epochs_run": len(result.epochs),
        "best_epoch": result.best_epoch,
        "train_samples_per_second": round(result.train_samples_per_second, 1),
        "lora": settings.train.model_dump(include={"lora_r", "lora_alpha", "lora_dropout", "target_modules"}),
    }
    # Parity and the drift reference on validation and holdout together: v1's holdout alone (70 imdb rows)
    # left the embedding MMD too little power to see amazon traffic within a window (measured in CI).
    judged = datasets.concat([val_rows, holdout])
    candidate = Candidate(
        model=result.model, tokenizer=tokenizer, base=base, labels=label_names, parity_rows=judged,
        reference_rows=judged, stored={"train": train_rows, "val": val_rows, "holdout": holdout},
        calibration_texts=train_rows.texts, training=training,
    )
    return BootstrapRun(candidate, result, train_rows, val_rows, holdout)


def train_on_feedback(settings: Settings, registry: Registry, run_id: int | None = None,
                      replay_ratio: float | None = None, progress: bool = True, say: Say = quiet,
                      started: float | None = None) -> FeedbackRun:
    """Fine-tune the live version on the feedback stored since it was published, plus a replay of its training rows;
    the time budget counts from `started` (`time.perf_counter()` at the run's start; default: training's start).

    Raises NothingToTrain when a rollout is in progress or too little new labelled data arrived."""
    live, live_dir = registry.resolve()
    rollout = registry.rollout()
    if rollout is not None:
        raise NothingToTrain(f"v{rollout.version} is in {rollout.stage}; let it finish or `tuneloop rollout withdraw` it first")
    data = build_dataset(FeedbackStore(settings.controller.store_url), live, live_dir, settings, replay_ratio)
    say(
        f"train: from v{live.version}; {data.new_train} new + {len(data.train) - data.new_train} replayed rows "
        f"to train, {len(data.val)} to validate, holdout {len(data.holdout)}"
    )
    result = finetune(settings, live, live_dir, data, progress, started)
    ratio = settings.train.replay_ratio if replay_ratio is None else replay_ratio
    evaluation = concat([data.holdout, data.new_holdout])
    training = {
        "run_id": run_id, "feedback_since": live.created_at, "feedback_rows": data.feedback_rows,
        "feedback_through": data.feedback_through,
        "new_train_rows": data.new_train,
        "new_holdout_rows": len(data.new_holdout), "replayed_rows": data.replayed, "replay_ratio": ratio,
        "warm_start": settings.train.warm_start,
        "imprinted_labels": result.imprinted_labels,
        "learning_rate": settings.train.finetune_learning_rate,
        "split_seed": settings.train.seed, "device": result.device, "precision": result.precision,
        "epochs_run": len(result.epochs),
        "best_epoch": result.best_epoch, "train_samples_per_second": round(result.train_samples_per_second, 1),
        "planned_epochs": result.planned_epochs, "steps": result.steps, "planned_steps": result.planned_steps,
        "time_budget_s": settings.train.finetune_time_budget_s,
        "train_seconds": round(result.seconds, 1),
    }
    base = resolve_base(settings.model)
    # Parity on every row at hand; the drift reference on the rows training never saw, which grow down
    # the lineage: the next run's gate and reference also see this run's new holdout rows.
    candidate = Candidate(
        model=result.model, tokenizer=load_tokenizer(base), base=base, labels=live.labels,
        parity_rows=concat([data.val, evaluation]), reference_rows=evaluation,
        stored={"train": data.train, "val": data.unseen_val, "holdout": evaluation}, calibration_texts=data.train.texts,
        training=training, parent_version=live.version,
    )
    return FeedbackRun(candidate, result, live, live_dir, data)
