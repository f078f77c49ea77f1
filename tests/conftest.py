"""Shared fixtures: a real bootstrapped model v1, a real `bentoml serve` on loopback, a real Kafka broker, a real
PostgreSQL server and a store on each backend.

Helpers that are not fixtures (data, launchers, waits) live in tests/support/."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.data import clinc_v1_rows, imdb_parts, validation_split
from tests.support.processes import (
    Server, local_broker, local_postgres, local_s3, run_cli, running_service, tuneloop_env,
)
from trainer.data import write_csv


@pytest.fixture(scope="session")
def torch_reference(registry_path: Path) -> np.ndarray:
    """Logits of the PyTorch model (base + v1's published adapter, unmerged) on validation_split()."""
    from trainer.model import load_adapted, load_tokenizer, predict, resolve_base
    from tuneloop.config import Settings
    from tuneloop.registry import Registry

    manifest, directory = Registry(registry_path).resolve()
    settings = Settings()
    base = resolve_base(settings.model)
    model = load_adapted(base, directory / "adapter", len(manifest.labels), settings.model)
    logits, _ = predict(model, load_tokenizer(base), validation_split().texts, settings.model.max_seq_length)
    return logits


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding model v1, bootstrapped on 70 % of the shipped imdb data by the real CLI."""
    path = tmp_path_factory.mktemp("registry")
    run_cli("bootstrap", "--data", str(imdb_parts()[0]), "--no-progress", env=tuneloop_env(path))
    return path


@pytest.fixture(scope="module")
def service(registry_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_service(registry_path, tmp_path_factory.mktemp("serve")) as server:
        yield server


@pytest.fixture(scope="session")
def kafka() -> Iterator[object]:
    """One real Kafka broker (KRaft) on loopback for the whole session."""
    with local_broker.running_kafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """One real PostgreSQL server (Debian's `postgresql`, a fresh initdb) on loopback for the whole session."""
    try:
        local_postgres.bindir()
    except local_postgres.ServerError as exc:
        if os.environ.get("CI"):
            raise  # CI installs PostgreSQL (.ci/run): a missing server there is a failure, not a skip
        pytest.skip(str(exc))
    with local_postgres.running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty feedback store on each backend: a SQLite file, or a database of its own on the session's
    PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("postgres").create_database(f"test_{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def s3() -> Iterator[object]:
    """One real S3-compatible server (versitygw, built from the Go module proxy) on loopback for the session;
    its AWS_* variables are set for the session, as an operator would set them."""
    with local_s3.running_s3() as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        yield server


@pytest.fixture(params=["directory", "s3"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty registry on each backend: a directory, or a bucket of its own on the session's S3 server."""
    if request.param == "directory":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3").create_bucket(f"test-{uuid.uuid4().hex[:16]}") + "/registry"


@pytest.fixture(scope="session")
def clinc_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference scenario's v1: three CLINC150 domains (clinc_v1_rows), all six domains' intents declared."""
    from trainer import scenario

    path = tmp_path_factory.mktemp("clinc-registry")
    data = write_csv(path.parent / f"{path.name}-bootstrap.csv", clinc_v1_rows())
    labels = ",".join(scenario.label_set())
    run_cli("bootstrap", "--data", str(data), "--labels", labels, "--no-progress", env=tuneloop_env(path))
    return path
