"""Readiness follows the registry: no verified model, no traffic."""

from __future__ import annotations

import math

import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import running_service
from tuneloop.registry import Registry

pytestmark = pytest.mark.slow


def copy_registry(source: Path, target: Path) -> None:
    shutil.copytree(source / "versions", target / "versions")
    shutil.copy(source / "live", target / "live")


def test_empty_registry_is_live_not_ready_then_ready_once_a_version_appears(
    registry_path: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "registry"
    empty.mkdir()
    with running_service(empty, tmp_path, wait_ready=False) as server, server.client() as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 503
        response = client.post("/predict", json={"texts": ["hello"]})
        assert response.status_code == 503
        assert "tuneloop bootstrap" in response.json()["error"]
        assert client.get("/model").status_code == 503
        assert "tuneloop_model_loaded 0.0" in client.get("/metrics").text

        copy_registry(registry_path, empty)
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.5)
        assert client.post("/predict", json={"texts": ["hello"]}).json()[0]["model_version"] == 1


def test_a_tampered_model_is_never_served(registry_path: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "registry"
    copy_registry(registry_path, tampered)
    model = tampered / "versions" / "v1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit's worth of corruption in the weights
    model.write_bytes(bytes(data))
    with running_service(tampered, tmp_path, wait_ready=False) as server, server.client() as client:
        deadline = time.monotonic() + 30
        while "model.onnx has sha256" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.5)
        assert client.get("/readyz").status_code == 503
        assert client.post("/predict", json={"texts": ["hello"]}).status_code == 503


def test_torch_eager_backend_switch_serves_the_same_version(registry_path: Path, tmp_path: Path) -> None:
    texts = ["An absolute delight from start to finish.", "I want those two hours back.", "Superb performances and a clever script."]
    with running_service(registry_path, tmp_path, TUNELOOP_SERVE__BACKEND="torch") as server:
        with server.client() as client:
            eager = client.post("/predict", json={"texts": texts}).json()
            info = client.get("/model").json()
    assert info["backend"] == "torch"
    with running_service(registry_path, tmp_path) as server:
        onnx_predictions = httpx.post(server.url + "/predict", json={"texts": texts}, timeout=30).json()
    # int8 moves each logit by at most the export's measured max |logit diff| (on validation), so the
    # log-odds of the two backends differ by at most twice that; a fixed probability tolerance would
    # be too tight near p = 0.7 and too loose near 1. The labels must agree wherever the eager model's
    # margin is wider than that bound; a text closer to the boundary may flip, and int8 promises no more.
    bound = 2 * Registry(registry_path).manifest(1).metrics["parity"]["max_abs_logit_diff"] + 0.1
    decided = 0
    for e, o in zip(eager, onnx_predictions, strict=True):
        assert e["model_version"] == o["model_version"] == 1
        log_odds = [math.log(p["scores"]["positive"] / p["scores"]["negative"]) for p in (e, o)]
        assert abs(log_odds[0] - log_odds[1]) <= bound, (e, o, bound)
        if abs(log_odds[0]) > bound:
            decided += 1
            assert e["label"] == o["label"], (e, o, bound)
    assert decided >= 2, "the texts no longer test label agreement: the bootstrap model is unsure of them"


def test_every_worker_is_ready_once_the_service_reports_ready(registry_path: Path, tmp_path: Path) -> None:
    """Readiness is answered per worker; with a model present no worker may take traffic before loading it."""
    with running_service(registry_path, tmp_path, TUNELOOP_SERVE__WORKERS="2") as server:
        # Fresh connections land on either worker; none may refuse.
        statuses = [httpx.post(server.url + "/predict", json={"texts": ["ok"]}, timeout=30).status_code for _ in range(40)]
    assert statuses == [200] * 40
