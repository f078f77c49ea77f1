"""Labelled text datasets: CSV loading, label sets and deterministic splits."""

from __future__ import annotations

import csv
import hashlib
import io
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sklearn.model_selection import train_test_split

from tuneloop.errors import DataError


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    source: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> LabelledTexts:
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.source)


def load_csv(path: Path | str) -> LabelledTexts:
    """Read a CSV with at least the columns ``text`` and ``label``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        # newline="": csv alone decides where a row ends; str.splitlines() also broke quoted fields at U+2028, U+0085, ...
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc})") from None
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise DataError(f"{path}: needs a header with the columns 'text' and 'label'")
    texts, labels = [], []
    for line, row in enumerate(rows, start=2):
        text, label = (row.get("text") or "").strip(), (row.get("label") or "").strip()
        if not text or not label:
            raise DataError(f"{path}:{line}: empty text or label")
        texts.append(text)
        labels.append(label)
    source = {
        "path": str(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "rows": len(texts),
        "label_counts": dict(sorted(Counter(labels).items())),
    }
    return LabelledTexts(texts, labels, source)


def concat(parts: list[LabelledTexts]) -> LabelledTexts:
    return LabelledTexts([t for p in parts for t in p.texts], [label for p in parts for label in p.labels])


def write_csv(path: Path, data: LabelledTexts) -> Path:
    """Write text,label rows (the format load_csv reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        writer.writerows(zip(data.texts, data.labels, strict=True))
    return path


def label_set(data: LabelledTexts, declared: list[str] | None = None) -> list[str]:
    """The model's output labels: the declared list (which may name labels the data lacks) or the sorted data labels."""
    found = sorted(set(data.labels))
    if not declared:
        return found
    if len(set(declared)) != len(declared):
        raise DataError(f"declared labels repeat a name: {declared}")
    unknown = sorted(set(found) - set(declared))
    if unknown:
        raise DataError(f"the data has labels that were not declared: {unknown}")
    return list(declared)


def split(data: LabelledTexts, val_fraction: float, seed: int) -> tuple[LabelledTexts, LabelledTexts]:
    """Stratified train/validation split; the same data and seed always give the same split."""
    indices = list(range(len(data)))
    counts = Counter(data.labels)
    stratify = data.labels if min(counts.values()) >= 2 else None
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=stratify)
    return data.subset(sorted(train_idx)), data.subset(sorted(val_idx))


def split3(data: LabelledTexts, val_fraction: float, holdout_fraction: float, seed: int
           ) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """Train, validation (early stopping) and holdout rows, each a fraction of the whole; stratified, deterministic.

    The holdout is never trained on nor used to stop training: the gate judges on it, so its verdicts
    are not flattered by rows the model was fitted or selected on."""
    rest, holdout = split(data, holdout_fraction, seed)
    train, val = split(rest, val_fraction / (1 - holdout_fraction), seed)
    return train, val, holdout


def traffic_order(rows: int, events: int, seed: int) -> list[int]:
    """Row indices for replaying `events` requests from `rows` rows: shuffled passes, each row once per pass.

    Drawing with replacement instead repeats rows inside a drift window, which then carries the pool's
    own sampling error on top of its own: held-out imdb replayed so alarmed in 7-14 % of no-shift windows,
    against 0.5 % in passes (`benchmarks/drift.py`)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < events:
        order += rng.sample(range(rows), rows)
    return order[:events]
