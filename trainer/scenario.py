"""The reference scenario: CLINC150's domain shift, from the shipped six-domain copy.

Model v1 learns three domains (banking, travel, kitchen_and_dining) with the intents of all six
declared up front; traffic then comes from the three others (auto_and_commute, home, utility),
whose intents v1 has never seen. Every selection is deterministic for a given seed.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from trainer.data import LabelledTexts

CLINC_SIX_DOMAINS = Path(__file__).resolve().parent.parent / "data" / "intent" / "clinc150-six-domains.csv"
OLD_DOMAINS = ("banking", "travel", "kitchen_and_dining")
NEW_DOMAINS = ("auto_and_commute", "home", "utility")


def _rows(path: Path = CLINC_SIX_DOMAINS) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def label_set(path: Path = CLINC_SIX_DOMAINS) -> list[str]:
    """Every intent of the six domains, old domains first, each domain's intents sorted."""
    rows = _rows(path)
    return [label for domain in OLD_DOMAINS + NEW_DOMAINS for label in sorted({r["label"] for r in rows if r["domain"] == domain})]


def sample(domains: tuple[str, ...], split: str, per_label: int | None, seed: int,
           path: Path = CLINC_SIX_DOMAINS) -> LabelledTexts:
    """Up to per_label rows of each intent of the domains from one original split (None: all), shuffled."""
    by_label: dict[str, list[str]] = {}
    for row in _rows(path):
        if row["domain"] in domains and row["split"] == split:
            by_label.setdefault(row["label"], []).append(row["text"])
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        texts = by_label[label]
        picked = rng.sample(texts, per_label) if per_label is not None and per_label < len(texts) else list(texts)
        chosen += [(text, label) for text in picked]
    rng.shuffle(chosen)
    return LabelledTexts([t for t, _ in chosen], [label for _, label in chosen],
                         {"path": str(path), "domains": list(domains), "split": split, "per_label": per_label, "seed": seed})
