"""Readiness follows the registry: no verified model, no traffic."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.processes import running_service, wait_for
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
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, lambda: f"readiness:\n{server.log_text()}", 0.5)
        assert client.post("/predict", json={"texts": ["hello"]}).json()[0]["model_version"] == 1


def test_a_tampered_model_is_never_served(registry_path: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "registry"
    copy_registry(registry_path, tampered)
    model = tampered / "versions" / "v1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit's worth of corruption in the weights
    model.write_bytes(bytes(data))
    with running_service(tampered, tmp_path, wait_ready=False) as server, server.client() as client:
        wait_for(lambda: "model.onnx has sha256" in server.log_text(), 30,
                 lambda: f"the sha256 refusal in the log:\n{server.log_text()}", 0.5)
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
    """Readiness is answered per worker; with a model present no worker may take traffic before loading it.

    The requests start the moment one worker answers /readyz, on fresh concurrent connections, until both
    workers have answered (each names itself): a worker that took every request would leave the other untested,
    and fails the test.
    """
    def fresh_predict(_: int) -> tuple[int, str]:
        response = httpx.post(server.url + "/predict", json={"texts": ["ok"]}, timeout=30)
        return response.status_code, response.headers["x-tuneloop-worker"]

    with running_service(registry_path, tmp_path, TUNELOOP_SERVE__WORKERS="2") as server:
        answers: list[tuple[int, str]] = []
        with ThreadPoolExecutor(8) as pool:
            while len({worker for _, worker in answers}) < 2 and len(answers) < 400:
                answers += pool.map(fresh_predict, range(16))
    assert {status for status, _ in answers} == {200}, answers
    assert {worker for _, worker in answers} == {"1", "2"}, f"one worker took all {len(answers)} requests"


# Root, stripped of the two capabilities that let it read anyone's files, reads as any other user does.
AS_ANOTHER_USER = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", "--")
PUBLISHER_UID = 1034  # BentoML images' user: here the trainer, so that the replica is someone else


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv (util-linux)")
def test_a_replica_under_another_uid_serves_what_the_trainer_published(registry_path: Path, tmp_path: Path) -> None:
    """Versions were published 0700 (mkdtemp), so a replica running as another user than the trainer never got
    ready. The copy keeps the modes the registry wrote; its files then belong to another uid than the server's."""
    registry = tmp_path / "registry"
    copy_registry(registry_path, registry)
    for path in [registry, *registry.rglob("*")]:
        os.chown(path, PUBLISHER_UID, PUBLISHER_UID)
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.chown(secret, PUBLISHER_UID, PUBLISHER_UID)
    secret.chmod(0o600)
    # The launcher does take root's reach away: it cannot read another user's private file.
    assert subprocess.run([*AS_ANOTHER_USER, "cat", str(secret)], capture_output=True).returncode != 0
    with running_service(registry, tmp_path, launcher=AS_ANOTHER_USER, wait_ready=False) as server:
        wait_for(lambda: httpx.get(server.url + "/readyz", timeout=5).status_code == 200, 90,
                 "the replica to load a version another user published")
        answer = httpx.post(server.url + "/predict", json={"texts": ["A fine film."]}, timeout=30)
    assert answer.status_code == 200 and answer.json()[0]["model_version"] == 1, answer.text
