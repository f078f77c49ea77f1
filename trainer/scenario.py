"""Scenarios of the loop on shipped real data: what v1 learns, what arrives with feedback, what it is tested on.

- CLINC150 domain expansion: v1 learns 3 of the 10 domains, with the intents of 6 declared; traffic
  then brings the 3 others, whose intents v1 has never seen. Which domains is drawn by a seed; the
  reference scenario (tests, demo) keeps one fixed draw: banking, travel, kitchen_and_dining, then
  auto_and_commute, home, utility.
- BANKING77 label expansion: v1 learns about half of the 77 intents (drawn by a seed), the rest arrive.
- Sentiment input shift: v1 learns IMDB movie-review sentences; Amazon product reviews arrive, with
  the same two labels.

Every selection is deterministic for a given seed; feedback rows never overlap the bootstrap rows or the test rows.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from trainer.data import LabelledTexts, split

DATA = Path(__file__).resolve().parent.parent / "data"
CLINC150 = DATA / "intent" / "clinc150.csv"
BANKING77 = DATA / "intent" / "banking77.csv"
IMDB, AMAZON = DATA / "sentiment" / "imdb.csv", DATA / "sentiment" / "amazon.csv"
OLD_DOMAINS = ("banking", "travel", "kitchen_and_dining")
NEW_DOMAINS = ("auto_and_commute", "home", "utility")
CLINC_DOMAINS = (
    "auto_and_commute", "banking", "credit_cards", "home", "kitchen_and_dining", "meta", "small_talk", "travel",
    "utility", "work",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: Literal["expansion", "no_new_labels"]
    seed: int
    labels: list[str]  # declared when v1 is bootstrapped: old labels first
    bootstrap: LabelledTexts  # v1's training data
    feedback: LabelledTexts  # labelled traffic after the shift
    test_old: LabelledTexts  # test rows of what v1 knew
    test_new: LabelledTexts  # test rows of what arrived (new labels, or the new input domain)

    @property
    def old_labels(self) -> list[str]:
        return sorted(set(self.bootstrap.labels))


@cache
def _rows(path: Path) -> tuple[dict[str, str], ...]:
    with path.open(newline="", encoding="utf-8") as handle:
        return tuple(csv.DictReader(handle))


def _pick(path: Path, labels: set[str] | None, split_name: str, per_label: int | None, seed: int,
          skip: int = 0, domains: tuple[str, ...] | None = None) -> LabelledTexts:
    """Up to per_label rows of each label (after skipping the first `skip` of each label's shuffled rows), shuffled."""
    by_label: dict[str, list[str]] = {}
    for row in _rows(path):
        if row["split"] == split_name and (labels is None or row["label"] in labels) and (
                domains is None or row["domain"] in domains):
            by_label.setdefault(row["label"], []).append(row["text"])
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        texts = rng.sample(by_label[label], len(by_label[label]))[skip:]
        chosen += [(text, label) for text in (texts if per_label is None else texts[:per_label])]
    rng.shuffle(chosen)
    return LabelledTexts([t for t, _ in chosen], [label for _, label in chosen],
                         {"path": path.name, "split": split_name, "per_label": per_label, "seed": seed})


def domain_labels(domains: tuple[str, ...]) -> list[str]:
    """The intents of CLINC150 domains, domain by domain, each domain's intents sorted."""
    rows = _rows(CLINC150)
    return [label for domain in domains for label in sorted({r["label"] for r in rows if r["domain"] == domain})]


def label_set() -> list[str]:
    """The reference scenario's declared labels: every intent of its six domains, old domains first."""
    return domain_labels(OLD_DOMAINS + NEW_DOMAINS)


def sample(domains: tuple[str, ...], split_name: str, per_label: int | None, seed: int, skip: int = 0) -> LabelledTexts:
    """Up to per_label rows of each intent of CLINC150 domains from one original split (None: all), shuffled;
    `skip` leaves out the rows a sample of that many per intent with the same seed took."""
    return _pick(CLINC150, None, split_name, per_label, seed, skip, domains=domains)


def out_of_scope(split_name: str, rows: int | None, seed: int) -> LabelledTexts:
    """Up to `rows` of CLINC150's out-of-scope queries (label `oos`) from one original split ('train', 'val',
    'test'), shuffled: texts no intent of the data set covers."""
    return _pick(CLINC150, {"oos"}, f"oos_{split_name}", rows, seed)


def clinc(seed: int | None = None, bootstrap_per_intent: int = 30, feedback_per_intent: int = 20) -> Scenario:
    """CLINC150: 3 known domains, then 3 arriving (about 20 feedback rows per new intent). None: the reference draw."""
    if seed is None:
        old, new = OLD_DOMAINS, NEW_DOMAINS
    else:
        drawn = random.Random(seed).sample(CLINC_DOMAINS, 6)
        old, new = tuple(drawn[:3]), tuple(drawn[3:])
    return Scenario(
        name=f"clinc150 {'+'.join(old)} -> {'+'.join(new)}", kind="expansion", seed=-1 if seed is None else seed,
        labels=domain_labels(old + new),
        bootstrap=_pick(CLINC150, None, "train", bootstrap_per_intent, 0, domains=old),
        feedback=_pick(CLINC150, None, "train", feedback_per_intent, 2, domains=new),
        test_old=_pick(CLINC150, None, "test", None, 3, domains=old),
        test_new=_pick(CLINC150, None, "test", None, 3, domains=new),
    )


def banking77(seed: int, bootstrap_per_intent: int = 30, feedback_per_intent: int = 20) -> Scenario:
    """BANKING77: v1 knows about half of the intents (drawn by the seed); the others arrive with feedback."""
    labels = sorted({r["label"] for r in _rows(BANKING77)})
    shuffled = random.Random(seed).sample(labels, len(labels))
    old, new = sorted(shuffled[: len(labels) // 2]), sorted(shuffled[len(labels) // 2 :])
    return Scenario(
        name="banking77 half the intents -> all", kind="expansion", seed=seed, labels=old + new,
        bootstrap=_pick(BANKING77, set(old), "train", bootstrap_per_intent, seed),
        feedback=_pick(BANKING77, set(new), "train", feedback_per_intent, seed),
        test_old=_pick(BANKING77, set(old), "test", None, seed),
        test_new=_pick(BANKING77, set(new), "test", None, seed),
    )


def sentiment(seed: int, feedback_rows: int = 400) -> Scenario:
    """IMDB -> Amazon: the same two labels, new inputs. v1 learns 70 % of IMDB; feedback is Amazon rows."""
    from trainer.data import load_csv

    imdb_train, imdb_test = split(load_csv(IMDB), 0.3, seed)
    amazon_rest, amazon_test = split(load_csv(AMAZON), 0.3, seed)
    feedback = amazon_rest.subset(sorted(random.Random(seed).sample(range(len(amazon_rest)), feedback_rows)))
    return Scenario(
        name="imdb -> amazon", kind="no_new_labels", seed=seed, labels=sorted(set(imdb_train.labels)),
        bootstrap=imdb_train, feedback=feedback, test_old=imdb_test, test_new=amazon_test,
    )
