from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data import DataError, label_set, load_csv, split
from tests.conftest import IMDB


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
