"""Every error tuneloop raises on purpose, under one base class, and what each means outside the process.

Each class carries the HTTP status an endpoint answers with when it escapes a handler (`http_status`)
and the exit code a command ends with (`exit_code`): the mapping lives here and nowhere else, as in
httpx's and KServe's exception modules. Classes that were `ValueError`s or `RuntimeError`s keep those
bases too, so existing `except ValueError` handlers still catch them.

The exit codes of `tuneloop train` are a contract with the controller, which reads a run's status from
them (`ExitCode`, `RUN_STATUS`).
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """How a `tuneloop` command ends."""

    OK = 0  # done: published, promoted, rollout started, nothing needed
    FAILED = 1  # an error; the message says what
    NOTHING_TO_DO = 2  # bad input (data, option), or `train` with too little new data / a rollout in progress
    REJECTED = 3  # `train`: the candidate failed the gate (kept in the registry, never served)


# A training run's status by its process's exit code; any other code is a failure.
RUN_STATUS: dict[int, str] = {ExitCode.OK: "succeeded", ExitCode.NOTHING_TO_DO: "skipped", ExitCode.REJECTED: "rejected"}


class TuneloopError(Exception):
    """The root: an error tuneloop raises on purpose; the message says what to do."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = ExitCode.FAILED


# --- the base (tuneloop/) ---


class RegistryError(TuneloopError):
    """A registry operation could not be done (no such version, a rejected one, no rollout in progress...)."""

    http_status = 409


class RegistryUnavailable(RegistryError):
    """The registry's storage did not answer (an S3 endpoint away); nothing was changed."""

    http_status = 503


class IntegrityError(RegistryError):
    """A stored file does not match its manifest."""

    http_status = 500


class StoreError(TuneloopError):
    """The feedback store cannot be opened or reached (no backend for its URL, a driver missing, a server away)."""

    http_status = 503


class MessageTooLarge(TuneloopError):
    """A message over the bus's size limit (`tuneloop.bus.MAX_MESSAGE_BYTES`): no retry can deliver it."""

    http_status = 413


class BusUnavailable(TuneloopError):
    """The bus did not acknowledge in time; the message may or may not have been stored."""

    http_status = 503


# --- requests (services/, monitoring/admin) ---


class InvalidRequest(TuneloopError, ValueError):
    """A request the service refuses as it is (a field, a limit, an unknown label)."""

    http_status = 400


class RequestTooLarge(InvalidRequest):
    """A request body over serve.max_body_bytes."""

    http_status = 413


class UnsupportedMediaType(InvalidRequest):
    """A request body in another format than the JSON the endpoint reads."""

    http_status = 415


class NotAuthenticated(TuneloopError):
    """A missing or wrong bearer token."""

    http_status = 401


class Forbidden(TuneloopError):
    """The endpoint is disabled (no controller.admin_token)."""

    http_status = 403


class Conflict(TuneloopError):
    """The request clashes with the state (a training run in progress)."""

    http_status = 409


class Unavailable(TuneloopError):
    """Not now, retry later: no verified model loaded yet, the controller loop not running."""

    http_status = 503


class NotDurable(Unavailable):
    """Nothing durable took the messages: the bus did not acknowledge them and no spool could."""


class FeedbackRefused(Unavailable):
    """Nothing durable accepted the feedback; the client must retry."""


# --- training and export (trainer/, exporters/) ---


class DataError(TuneloopError, ValueError):
    """The dataset cannot be used; the message names the file, row or label."""

    http_status = 400
    exit_code = ExitCode.NOTHING_TO_DO


class RunWithdrawn(TuneloopError):
    """A training run is no longer this process's to finish: the controller marked it failed (no heartbeat in
    time) or it was never claimed. Nothing is published."""

    exit_code = ExitCode.FAILED


class NothingToTrain(TuneloopError, RuntimeError):
    """Too little new labelled data, or a rollout in progress; the message says which."""

    http_status = 409
    exit_code = ExitCode.NOTHING_TO_DO


class ParityError(TuneloopError, RuntimeError):
    """No quantization recipe reached the required agreement; nothing is published."""


class UnsupportedGraph(TuneloopError, ValueError):
    """The graph is not the fused BERT-like encoder this recipe knows how to transform."""


def http_status(exc: BaseException) -> int:
    """The status an endpoint answers `exc` with: its class's, 500 for anything unplanned."""
    return exc.http_status if isinstance(exc, TuneloopError) else 500


def exit_code(exc: BaseException) -> int:
    """The exit code a command ends with on `exc`."""
    return exc.exit_code if isinstance(exc, TuneloopError) else ExitCode.FAILED
