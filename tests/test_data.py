from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.data import IMDB, LINE_BREAKING
from trainer.data import DataError, LabelledTexts, label_set, load_csv, split, split3, traffic_order, write_csv


def test_imdb_copy_loads_with_its_provenance() -> None:
    data = load_csv(IMDB)
    assert len(data) == 1000
    assert data.source["label_counts"] == {"negative": 500, "positive": 500}
    assert len(str(data.source["sha256"])) == 64


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    data = load_csv(IMDB)
    train_a, val_a = split(data, 0.2, seed=13)
    train_b, val_b = split(data, 0.2, seed=13)
    assert val_a.texts == val_b.texts and train_a.texts == train_b.texts
    assert len(val_a) == 200 and len(train_a) == 800
    assert val_a.labels.count("positive") == 100  # stratified
    _, val_other = split(data, 0.2, seed=14)
    assert val_other.texts != val_a.texts


def test_declared_labels_may_exceed_the_data_but_must_cover_it() -> None:
    data = load_csv(IMDB)
    assert label_set(data) == ["negative", "positive"]
    assert label_set(data, ["positive", "negative", "neutral"]) == ["positive", "negative", "neutral"]
    with pytest.raises(DataError, match="not declared: \\['positive'\\]"):
        label_set(data, ["negative", "neutral"])
    with pytest.raises(DataError, match="repeat"):
        label_set(data, ["negative", "positive", "negative"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sentence,score\nhello,1\n", "columns 'text' and 'label'"),
        ("text,label\nhello,\n", ":2: empty text or label"),
        ("", "columns"),
    ],
)
def test_bad_csv_is_refused_with_the_reason(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_csv(path)


def test_non_utf8_and_missing_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_csv(path)
    with pytest.raises(DataError, match="no such file"):
        load_csv(tmp_path / "absent.csv")


def test_three_way_split_is_disjoint_stratified_and_deterministic() -> None:
    data = LabelledTexts([f"t{i}" for i in range(200)], ["a", "b"] * 100)
    train, val, holdout = split3(data, 0.1, 0.1, seed=13)
    assert (len(train), len(val), len(holdout)) == (160, 20, 20)
    assert not (set(train.texts) & set(val.texts)) and not (set(train.texts) & set(holdout.texts))
    assert not (set(val.texts) & set(holdout.texts))
    assert holdout.labels.count("a") == 10
    assert split3(data, 0.1, 0.1, seed=13)[2].texts == holdout.texts


def test_traffic_order_replays_every_row_once_per_pass() -> None:
    order = traffic_order(300, 2000, seed=5)
    assert len(order) == 2000 and order == traffic_order(300, 2000, seed=5)
    passes = [order[start : start + 300] for start in range(0, 1800, 300)]
    assert all(sorted(p) == list(range(300)) for p in passes)  # no row twice before every row once
    assert passes[0] != passes[1] and len(set(order[1800:])) == 200


def test_texts_with_unicode_line_breaks_survive_write_and_load(tmp_path: Path) -> None:
    rows = LabelledTexts(LINE_BREAKING, ["a"] * len(LINE_BREAKING))
    loaded = load_csv(write_csv(tmp_path / "odd.csv", rows))
    assert loaded.texts == LINE_BREAKING and loaded.labels == rows.labels
