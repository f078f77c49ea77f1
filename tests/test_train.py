"""trainer/train.py: the learning-rate schedule, and epochs planned to fit a time budget in a real fit."""

from __future__ import annotations

import torch

from tests.support.data import IMDB
from trainer.data import load_csv
from trainer.model import add_lora, build_classifier, load_tokenizer, resolve_base
from trainer.train import LinearSchedule, TrainResult, epochs_within, fit
from tuneloop.config import ModelConfig, TrainConfig


def test_the_schedule_warms_up_decays_to_zero_and_can_be_shortened() -> None:
    schedule = LinearSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=100)
    assert schedule.warmup == 6
    assert schedule.factor(0) == 0 and schedule.factor(6) == 1 and schedule.factor(100) == 0
    assert 0.45 < schedule.factor(53) < 0.55
    schedule.total_steps = 50  # the budget allows half the run: it ends at step 50, decaying from where it is
    assert schedule.factor(25) > schedule.factor(40) > schedule.factor(50) == 0


def test_epochs_within_a_budget() -> None:
    assert epochs_within(120, elapsed_s=30, epoch_s=25, done=1, most=8) == 4  # 90 s left: 3 more epochs of 25 s
    assert epochs_within(120, elapsed_s=30, epoch_s=5, done=1, most=8) == 8  # never more than max_epochs
    assert epochs_within(20, elapsed_s=30, epoch_s=25, done=1, most=8) == 1  # over budget: what ran is the run


def test_a_fit_stops_at_the_epoch_its_budget_allows() -> None:
    rows = load_csv(IMDB)
    train, val = rows.subset(list(range(32))), rows.subset(list(range(32, 48)))
    model_config, config = ModelConfig(), TrainConfig(max_epochs=4, patience=4, batch_size=16)
    base = resolve_base(model_config)
    labels = sorted(set(rows.labels))

    def run(budget_s: float) -> TrainResult:
        model = add_lora(build_classifier(base, 2, model_config), config)
        return fit(model, load_tokenizer(base), train, val, labels, config, 32, progress=False, frozen_layers=4,
                   time_budget_s=budget_s)

    roomy = run(budget_s=3600)
    assert (roomy.planned_epochs, len(roomy.epochs)) == (4, 4)
    tight = run(budget_s=1e-3)  # spent once the first epoch ends: that epoch is the run
    assert (tight.planned_epochs, len(tight.epochs), tight.best_epoch) == (1, 1, 1)
