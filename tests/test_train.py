"""trainer/train.py: the learning-rate schedule, and the steps planned to fit a time budget in a real fit."""

from __future__ import annotations

import torch

from tests.support.data import IMDB
from trainer.data import load_csv
from trainer.model import add_lora, build_classifier, load_tokenizer, resolve_base
from trainer.train import PROBE_STEPS, LinearSchedule, TrainResult, fit, steps_within
from tuneloop.config import ModelConfig, TrainConfig


def test_the_schedule_warms_up_decays_to_zero_and_can_be_shortened() -> None:
    schedule = LinearSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=100)
    assert schedule.warmup == 6
    assert schedule.factor(0) == 0 and schedule.factor(6) == 1 and schedule.factor(100) == 0
    assert 0.45 < schedule.factor(53) < 0.55
    schedule.total_steps = 50  # the budget allows half the run: it ends at step 50, decaying from where it is
    assert schedule.factor(25) > schedule.factor(40) > schedule.factor(50) == 0


def test_steps_within_a_budget() -> None:
    # 100 s left after epoch 1 (10 steps); steps of 1 s, a validation of 5 s at each epoch's end and at the run's:
    # 65 steps and 7 validations (epochs 2-7 and the run's end) take the 100 s
    assert steps_within(120, elapsed_s=20, step_s=1, validate_s=5, done=10, steps_per_epoch=10, most=80) == 75
    assert steps_within(120, elapsed_s=20, step_s=0.01, validate_s=0, done=10, steps_per_epoch=10, most=80) == 80  # never more than most
    assert steps_within(20, elapsed_s=30, step_s=1, validate_s=0, done=10, steps_per_epoch=10, most=80) == 10  # spent: what ran is the run
    assert steps_within(60, elapsed_s=0, step_s=1, validate_s=0, done=0, steps_per_epoch=100, most=800) == 60  # part of an epoch


def test_a_fit_ends_within_its_budget_even_inside_an_epoch() -> None:
    rows = load_csv(IMDB)
    train, val = rows.subset(list(range(96))), rows.subset(list(range(96, 112)))
    model_config, config = ModelConfig(), TrainConfig(max_epochs=4, patience=4, batch_size=4)  # 24 steps an epoch
    base = resolve_base(model_config)
    labels = sorted(set(rows.labels))

    def run(budget_s: float) -> TrainResult:
        model = add_lora(build_classifier(base, 2, model_config), config)
        return fit(model, load_tokenizer(base), train, val, labels, config, 32, progress=False, frozen_layers=4,
                   time_budget_s=budget_s)

    roomy = run(budget_s=3600)
    assert (roomy.planned_epochs, len(roomy.epochs), roomy.steps, roomy.planned_steps) == (4, 4, 96, 96)
    # Spent by the time the first steps have measured the speed: the run ends there, inside epoch 1, its
    # learning rate run down to zero over the steps it had, and that part-epoch is validated and kept.
    tight = run(budget_s=1e-3)
    assert PROBE_STEPS < 24
    assert (tight.steps, tight.planned_steps, tight.planned_epochs) == (PROBE_STEPS, PROBE_STEPS, 1)
    assert (len(tight.epochs), tight.best_epoch) == (1, 1)
