"""`tuneloop train`: fine-tune the live version on new feedback plus a replay of older data.

The dataset: feedback rows stored since the live version was published, split deterministically
into train, validation and holdout, plus a replay sample of the rows the live version was trained on
(`data/train.csv` in its registry directory), `train.replay_ratio` replayed rows per new row, all
of it trained on. Early stopping watches rows no version of the lineage trained on: the new
validation rows and the lineage's (`data/val.csv`, bootstrap's validation rows plus each run's new
ones). Replayed rows would not do: the live version fitted them, so their loss rises as soon as the
model moves towards the new data and stopped runs early (banking77:1: best epoch 3 of 5). Training
continues the live adapter (or a fresh one) at the fine-tuning learning rate. Export and the gate follow; nothing is
published until the whole candidate is staged, so a crash or kill at any point publishes nothing
(`trainer/runs.py` turns them into a run; `pipeline/versions.py` adds the exporter and its gate).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.data import LabelledTexts, concat, load_csv, split, split3
from trainer.imprint import imprint_new_labels
from trainer.model import add_lora, build_classifier, continue_adapter, load_tokenizer, resolve_base
from trainer.train import TrainResult, fit, pick_device
from tuneloop.clock import utc_iso
from tuneloop.config import Settings
from tuneloop.errors import NothingToTrain
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Manifest


@dataclass(frozen=True)
class FinetuneData:
    train: LabelledTexts
    val: LabelledTexts  # early stopping's rows
    unseen_val: LabelledTexts  # the validation rows no version trained on, handed down the lineage (data/val.csv)
    feedback_rows: int  # new rows in all: train, validation and holdout
    feedback_through: int  # the store's last row read: the next run's feedback starts after it
    new_train: int
    new_holdout: LabelledTexts  # new rows never trained on nor used to stop training: the gate's new rows
    replayed: int
    holdout: LabelledTexts  # evaluation rows handed down the lineage: the original holdout plus earlier runs' new rows
    known_labels: list[str]  # the labels the live version was trained on: the gate's forgetting check

    @property
    def new_labels(self) -> list[str]:
        """Labels with rows to train on that the live version was never trained on."""
        return sorted(set(self.train.labels) - set(self.known_labels))


def balanced_sample(pool: LabelledTexts, wanted: int, seed: int) -> list[int]:
    """`wanted` row indices spread as evenly over the pool's labels as it allows (a rare label gives all it has).

    A replay sample drawn in proportion would let a frequent old label crowd out the rare ones the
    model is most likely to forget."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(pool.labels):
        by_label.setdefault(label, []).append(index)
    queues = [rng.sample(indices, len(indices)) for _, indices in sorted(by_label.items())]
    picked: list[int] = []
    while len(picked) < wanted and any(queues):
        for queue in queues:
            if queue and len(picked) < wanted:
                picked.append(queue.pop())
    return sorted(picked)


def build_dataset(store: FeedbackStore, live: Manifest, live_dir: Path, settings: Settings,
                  replay_ratio: float | None = None) -> FinetuneData:
    """New feedback since the live version plus its replay sample, both split with the configured seed."""
    through = live.training_data.get("feedback_through")
    if through is None:  # v1, or a version from before row marks: by time (a child is published minutes after its read)
        since = utc_iso(live.created_at)
        rows = [r for r in store.feedback_rows() if r["stored_at"] > since]
    else:  # the row after the last one its run read: feedback stored while it trained is the next run's
        rows = store.feedback_rows(after=int(through))
    feedback_through = max((int(r["row_id"]) for r in rows), default=int(through or 0))
    unknown = sorted({r["label"] for r in rows} - set(live.labels))
    if unknown:  # the service refuses such labels; a row with one can only come from outside it
        rows = [r for r in rows if r["label"] in live.labels]
    if len(rows) < settings.train.min_feedback_rows:
        raise NothingToTrain(
            f"{len(rows)} labelled rows arrived since v{live.version} "
            f"{'was published' if through is None else 'read the feedback store'}; "
            f"train.min_feedback_rows is {settings.train.min_feedback_rows}"
        )
    new = LabelledTexts([str(r["text"]) for r in rows], [str(r["label"]) for r in rows], {"feedback_rows": len(rows)})
    seed, fraction = settings.train.seed, settings.train.val_fraction
    new_train, new_val, new_holdout = split3(new, fraction, settings.train.holdout_fraction, seed)
    ratio = settings.train.replay_ratio if replay_ratio is None else replay_ratio
    pool_path = live_dir / "data" / "train.csv"
    lineage_val_path = live_dir / "data" / "val.csv"
    lineage_val = load_csv(lineage_val_path) if lineage_val_path.is_file() else None
    unseen_val = new_val if lineage_val is None else concat([new_val, lineage_val])
    parts_train, val, replayed = [new_train], unseen_val, 0
    pool = load_csv(pool_path) if pool_path.is_file() else None
    if ratio > 0 and pool is not None:
        wanted = min(len(pool), round(ratio * len(new)))
        replay = pool.subset(balanced_sample(pool, wanted, seed))
        if lineage_val is None:  # a version published before data/val.csv existed: validate on some replay
            replay, replay_val = split(replay, fraction, seed)
            val = concat([val, replay_val])
        parts_train.append(replay)
        replayed = wanted
    pool_labels = set(pool.labels) if pool is not None else set()
    holdout_path = live_dir / "data" / "holdout.csv"
    if not holdout_path.is_file():
        raise NothingToTrain(f"v{live.version} carries no original-data holdout ({holdout_path}); the gate needs one")
    return FinetuneData(
        train=concat(parts_train), val=val, unseen_val=unseen_val, feedback_rows=len(new),
        feedback_through=feedback_through, new_train=len(new_train),
        new_holdout=new_holdout, replayed=replayed, holdout=load_csv(holdout_path),
        known_labels=[label for label in live.labels if pool is None or label in pool_labels],
    )


def finetune(settings: Settings, live: Manifest, live_dir: Path, data: FinetuneData, progress: bool = True,
             started: float | None = None) -> TrainResult:
    """Train a candidate from the live version (its adapter, or a fresh one): the adapter at the fine-tuning
    learning rate, the head at bootstrap's (it must learn intents it has never seen), the head rows of labels
    new to the lineage imprinted from their rows first (`train.imprint_new_labels`). The time budget counts from
    `started` (a `time.perf_counter()` value: the run's start, so that start-up and imprinting are inside it)."""
    base = resolve_base(settings.model)
    tokenizer = load_tokenizer(base)
    model = build_classifier(base, len(live.labels), settings.model)
    imprinted: list[str] = []
    if settings.train.warm_start:
        model = continue_adapter(model, live_dir / "adapter", settings.train)
        if settings.train.imprint_new_labels:
            model.to(pick_device(settings.train.device))  # where fit will train: the pass runs there too
            imprinted = imprint_new_labels(model, tokenizer, data.train, live.labels, data.new_labels,
                                           data.known_labels, settings.model.max_seq_length)
    else:
        model = add_lora(model, settings.train)
    config = settings.train.model_copy(update={"learning_rate": settings.train.finetune_learning_rate})
    result = fit(model, tokenizer, data.train, data.val, live.labels, config,
                 settings.model.max_seq_length, progress, head_learning_rate=settings.train.learning_rate,
                 frozen_layers=settings.train.finetune_frozen_layers, time_budget_s=settings.train.finetune_time_budget_s,
                 budget_from=started)
    return replace(result, imprinted_labels=imprinted)
