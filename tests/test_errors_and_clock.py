"""One timestamp format, one exception hierarchy with its HTTP statuses and exit codes."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tuneloop import errors
from tuneloop.clock import unix_seconds, utc_iso, utc_now

STORED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def test_timestamps_keep_the_stored_format_byte_for_byte() -> None:
    """The feedback store compares these as strings: the shape must be what earlier versions wrote."""
    assert STORED.match(utc_now())
    moment = datetime(2026, 11, 29, 14, 30, 0, 123456, tzinfo=UTC)
    old = moment.isoformat(timespec="milliseconds")  # how all five copies built it
    assert utc_iso(moment) == old == "2026-11-29T14:30:00.123+00:00"
    assert utc_iso(moment.timestamp()) == old
    assert utc_iso(moment.astimezone(timezone(timedelta(hours=2))).isoformat()) == old
    assert unix_seconds(old) == pytest.approx(moment.timestamp(), abs=1e-3)


def test_every_error_has_one_root_and_keeps_its_builtin_base() -> None:
    from exporters.calibrated_int8 import UnsupportedGraph
    from exporters.quantize import ParityError
    from trainer.data import DataError
    from trainer.finetune import NothingToTrain
    from tuneloop.bus import BusUnavailable
    from tuneloop.registry import IntegrityError, RegistryError

    for cls in (UnsupportedGraph, ParityError, DataError, NothingToTrain, BusUnavailable, IntegrityError, RegistryError):
        assert issubclass(cls, errors.TuneloopError) and cls.__module__ == "tuneloop.errors"
    assert issubclass(DataError, ValueError) and issubclass(UnsupportedGraph, ValueError)
    assert issubclass(NothingToTrain, RuntimeError) and issubclass(ParityError, RuntimeError)
    assert issubclass(IntegrityError, RegistryError)


def test_statuses_and_exit_codes_come_from_the_class() -> None:
    assert errors.http_status(errors.RegistryError("x")) == 409
    assert errors.http_status(errors.FeedbackRefused("x")) == 503
    assert errors.http_status(errors.RequestTooLarge("x")) == 413
    assert errors.http_status(KeyError("x")) == 500
    assert errors.exit_code(errors.NothingToTrain("x")) == errors.ExitCode.NOTHING_TO_DO == 2
    assert errors.exit_code(errors.DataError("x")) == 2
    assert errors.exit_code(RuntimeError("x")) == errors.ExitCode.FAILED == 1
    assert errors.RUN_STATUS == {0: "succeeded", 2: "skipped", 3: "rejected"}
