"""The fine-tuning dataset's replay sample (trainer/finetune.py)."""

from __future__ import annotations

from collections import Counter

from trainer.data import LabelledTexts
from trainer.finetune import balanced_sample

POOL = LabelledTexts([f"t{i}" for i in range(130)], ["common"] * 100 + ["middle"] * 25 + ["rare"] * 5)


def test_replay_spreads_over_labels_and_a_rare_label_gives_all_it_has() -> None:
    picked = balanced_sample(POOL, 45, seed=1)
    counts = Counter(POOL.labels[i] for i in picked)
    assert counts == {"common": 20, "middle": 20, "rare": 5}
    assert len(set(picked)) == 45 and picked == sorted(picked)


def test_replay_is_deterministic_and_never_exceeds_the_pool() -> None:
    assert balanced_sample(POOL, 30, seed=7) == balanced_sample(POOL, 30, seed=7)
    assert balanced_sample(POOL, 30, seed=7) != balanced_sample(POOL, 30, seed=8)
    assert len(balanced_sample(POOL, 500, seed=1)) == len(POOL)
