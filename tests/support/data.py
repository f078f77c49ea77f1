"""The shipped data the tests train and replay, split as the shared v1 was bootstrapped."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from cli.processes import ROOT
from trainer import scenario
from trainer.data import LabelledTexts, concat, load_csv, split, split3, write_csv

IMDB = ROOT / "data" / "sentiment" / "imdb.csv"
AMAZON = IMDB.with_name("amazon.csv")
# CI trains v1 for at most 3 epochs (about 100 s on 2 cores); `make up` uses the full default.
TEST_EPOCHS = "3"

# The CLINC150 v1 of the tests (conftest.clinc_registry) learns this many train rows of each old intent.
CLINC_V1_PER_INTENT = 30

__all__ = ["AMAZON", "IMDB", "ROOT", "TEST_EPOCHS", "clinc_unseen", "clinc_v1_rows", "imdb_parts", "validation_split"]


def clinc_v1_rows() -> LabelledTexts:
    """The rows the tests' CLINC150 v1 bootstraps on: CLINC_V1_PER_INTENT train rows of each old-domain intent."""
    return scenario.sample(scenario.OLD_DOMAINS, "train", CLINC_V1_PER_INTENT, seed=0)


def clinc_unseen(per_label: int | None = None) -> LabelledTexts:
    """Old-domain train rows that v1 never saw (up to per_label an intent): the reference's own distribution.
    CLINC's test split is a small real shift from it (test_windows.py)."""
    return scenario.sample(scenario.OLD_DOMAINS, "train", per_label, seed=0, skip=CLINC_V1_PER_INTENT)


@functools.cache
def imdb_parts() -> tuple[Path, LabelledTexts]:
    """Model v1 bootstraps on 70 % of imdb (this CSV); the other 30 % is traffic it has never seen."""
    bootstrap, traffic = split(load_csv(IMDB), 0.3, seed=13)
    return write_csv(Path(tempfile.mkdtemp(prefix="tuneloop-data-")) / "imdb-bootstrap.csv", bootstrap), traffic


@functools.cache
def validation_split() -> LabelledTexts:
    """The rows bootstrap checks int8 parity on: its validation and holdout rows of imdb_parts()[0]."""
    from tuneloop.config import Settings

    settings = Settings()
    _, val, holdout = split3(load_csv(imdb_parts()[0]), settings.train.val_fraction, settings.train.holdout_fraction,
                             settings.train.seed)
    return concat([val, holdout])


# Characters str.splitlines() treats as line ends, though csv (and every spreadsheet) keeps them inside a field.
LINE_BREAKING = ["line\u2028separator", "paragraph\u2029separator", "next\u0085line", "group\x1dseparator",
                 "crlf\r\ninside", "vertical\x0btab", "no-break\u00a0space"]
