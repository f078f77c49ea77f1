"""The fine-tuning dataset (trainer/finetune.py): its replay sample and its validation rows."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tests.support.data import LINE_BREAKING
from trainer.data import LabelledTexts, concat, load_csv, write_csv
from trainer.finetune import balanced_sample, build_dataset
from tuneloop.clock import utc_now
from tuneloop.config import Settings
from tuneloop.events import FeedbackEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Manifest

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


def lineage(tmp_path: Path, with_val: bool) -> tuple[FeedbackStore, Manifest, Path]:
    """A live version's data files and a store holding 100 new feedback rows (no model needed to build the dataset)."""
    live_dir = tmp_path / "v1"
    old = LabelledTexts([f"old {i}" for i in range(200)], ["a", "b"] * 100)
    write_csv(live_dir / "data" / "train.csv", old)
    write_csv(live_dir / "data" / "holdout.csv", LabelledTexts([f"held {i}" for i in range(20)], ["a", "b"] * 10))
    if with_val:
        write_csv(live_dir / "data" / "val.csv", LabelledTexts([f"val {i}" for i in range(20)], ["a", "b"] * 10))
    live = Manifest(version=1, created_at="2026-01-01T00:00:00+00:00", base_model="m", labels=["a", "b", "c"], files={})
    store = FeedbackStore(tmp_path / "feedback.db")
    store.write([], [FeedbackEvent(text=f"new {i}", label="c") for i in range(100)])
    return store, live, live_dir


def test_early_stopping_watches_rows_no_version_trained_on(tmp_path: Path) -> None:
    # Replayed rows were fitted by the live version: their loss rises as soon as the model moves
    # towards the new labels, and a validation set holding them stopped runs early.
    store, live, live_dir = lineage(tmp_path, with_val=True)
    data = build_dataset(store, live, live_dir, Settings())
    assert not set(data.val.texts) & {f"old {i}" for i in range(200)}
    assert {t for t in data.val.texts if t.startswith("val")} == {f"val {i}" for i in range(20)}
    assert any(t.startswith("new") for t in data.val.texts)
    assert data.replayed == 100 and sum(t.startswith("old") for t in data.train.texts) == 100
    assert data.unseen_val.texts == data.val.texts  # handed down as the candidate's data/val.csv


def test_a_version_without_validation_rows_still_validates_on_some_replay(tmp_path: Path) -> None:
    store, live, live_dir = lineage(tmp_path, with_val=False)
    data = build_dataset(store, live, live_dir, Settings())
    assert any(t.startswith("old") for t in data.val.texts)
    assert all(t.startswith("new") for t in data.unseen_val.texts)


def test_feedback_with_unicode_line_breaks_trains_and_the_next_generation_reads_it(tmp_path: Path) -> None:
    # A text with U+2028 or U+0085 split its CSV row in two on reading: the version trained on it was
    # published, and every later run from it failed with DataError.
    store, live, live_dir = lineage(tmp_path, with_val=True)
    store.write([], [FeedbackEvent(text=f"{text} {i}", label="c") for text in LINE_BREAKING for i in range(3)])
    first = build_dataset(store, live, live_dir, Settings())
    odd = {f"{text} {i}" for text in LINE_BREAKING for i in range(3)}
    assert odd <= set(first.train.texts) | set(first.val.texts) | set(first.new_holdout.texts)

    child_dir = tmp_path / "v2"  # the candidate's data files, as the exporter stores them
    for name, rows in {"train": first.train, "val": first.unseen_val,
                       "holdout": concat([first.holdout, first.new_holdout])}.items():
        write_csv(child_dir / "data" / f"{name}.csv", rows)
    child = Manifest(version=2, created_at=utc_now(), base_model="m", labels=["a", "b", "c"], files={}, parent_version=1,
                     training_data={"feedback_through": first.feedback_through})
    store.write([], [FeedbackEvent(text=f"later {i}", label="a") for i in range(100)])
    second = build_dataset(store, child, child_dir, Settings())
    assert any(text.startswith("later") for text in second.unseen_val.texts)
    assert set(first.unseen_val.texts) <= set(second.unseen_val.texts)  # the odd validation rows, handed down intact
    assert load_csv(child_dir / "data" / "train.csv").texts == first.train.texts


def test_feedback_stored_while_a_run_trained_is_the_next_runs(tmp_path: Path) -> None:
    # Rows were chosen by stored_at > the live version's created_at: a child's created_at is its publish time,
    # minutes after its run read the store, so what arrived in between was never trained on.
    store, live, live_dir = lineage(tmp_path, with_val=True)
    first = build_dataset(store, live, live_dir, Settings())
    assert first.feedback_rows == 100
    store.write([], [FeedbackEvent(text=f"during {i}", label="c") for i in range(60)])  # arrives while it trains
    time.sleep(0.01)  # then the child is published
    child = Manifest(version=2, created_at=utc_now(), base_model="m", labels=["a", "b", "c"], files={},
                     parent_version=1, training_data={"feedback_through": first.feedback_through})
    second = build_dataset(store, child, live_dir, Settings(train={"min_feedback_rows": 50}))
    new = [t for t in second.train.texts + second.val.texts + second.new_holdout.texts if not t.startswith("old")]
    assert {t for t in new if not t.startswith("val")} == {f"during {i}" for i in range(60)}
    assert second.feedback_through > first.feedback_through
