"""The admin endpoints in process: the token, each operation's answers, and what a rollback announces."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import MagicMock

import pytest
from fastapi.testclient import TestClient

from monitoring.admin import Admin, admin_app
from monitoring.state import ControllerState
from monitoring.trigger import Decision
from tuneloop.errors import RegistryUnavailable
from tuneloop.events import ModelEvent
from tuneloop.registry import Registry

TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def publish(registry: Registry, payload: bytes) -> int:
    with registry.staging() as stage:
        (stage / "model.onnx").write_bytes(payload)
        return registry.publish(stage, base_model="base", labels=["neg", "pos"]).version


class Setup:
    def __init__(self, tmp_path: Path, store_url: str, token: str = TOKEN) -> None:
        self.registry = Registry(tmp_path / "registry")
        publish(self.registry, b"v1")
        publish(self.registry, b"v2")
        self.drift = MagicMock()
        self.drift.policy.consecutive_by_version.return_value = {2: 1}
        self.announced: list[ModelEvent] = []
        self.admin = Admin(self.registry, ControllerState(store_url), self.drift, self.announced.append)
        self.client = TestClient(admin_app(self.admin, token))


def test_without_a_token_configured_the_admin_endpoints_are_disabled(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url, token="")
    response = s.client.get("/admin/status", headers=AUTH)
    assert response.status_code == 403 and "admin endpoints are disabled" in response.json()["detail"]
    assert s.client.get("/healthz").json() == {"status": "ok", "role": "leader"}


def test_a_waiting_controller_answers_health_and_refuses_admin_with_503() -> None:
    client = TestClient(admin_app(None, TOKEN))
    assert client.get("/healthz").json() == {"status": "ok", "role": "waiting"}
    for method, path in (("get", "/admin/status"), ("post", "/admin/rollback"), ("post", "/admin/trigger")):
        response = client.request(method, path, headers=AUTH, json={})
        assert response.status_code == 503 and "another leads" in response.json()["detail"], (path, response.text)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_a_missing_or_wrong_token_is_refused(tmp_path: Path, store_url: str, headers: dict[str, str]) -> None:
    response = Setup(tmp_path, store_url).client.post("/admin/rollback", json={}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_status_reports_the_live_version_and_the_trigger_counts(tmp_path: Path, store_url: str) -> None:
    status = Setup(tmp_path, store_url).client.get("/admin/status", headers=AUTH).json()
    assert status["live_version"] == 2 and status["rollout"] is None
    assert status["stable_version"] == 2  # its deprecated name, kept for one release
    assert status["consecutive_drift_windows"] == {"2": 1}
    assert status["running_runs"] == [] and status["recent_decisions"] == []


def test_a_rollback_serves_the_earlier_version_and_announces_it(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    response = s.client.post("/admin/rollback", json={"reason": "incident"}, headers=AUTH)
    assert response.status_code == 200 and response.json() == {"previous": 2, "version": 1}
    assert s.registry.live_version() == 1
    assert [(e.action, e.version, e.previous, e.reason) for e in s.announced] == [("rollback", 1, 2, "incident")]
    refused = s.client.post("/admin/rollback", json={"to": 7}, headers=AUTH)
    assert refused.status_code == 409
    assert len(s.announced) == 1


def test_a_manual_run_answers_202_409_or_503(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    s.drift.request_manual.return_value = (Decision("fired", "manual", "manual request: x", "manual"), 4)
    started = s.client.post("/admin/trigger", json={"reason": "x"}, headers=AUTH)
    assert started.status_code == 202 and started.json() == {"run_id": 4, "detail": "manual request: x"}
    s.drift.request_manual.assert_called_with("x", 30.0)
    s.drift.request_manual.return_value = (Decision("suppressed", "run_in_progress", "a run is in progress"), None)
    assert s.client.post("/admin/trigger", json={}, headers=AUTH).status_code == 409
    s.drift.request_manual.side_effect = TimeoutError("the controller loop did not answer")
    busy = s.client.post("/admin/trigger", json={}, headers=AUTH)
    assert busy.status_code == 503 and busy.json()["detail"] == "the controller loop did not answer"


def test_a_rollback_the_registry_cannot_answer_is_503_not_a_conflict(tmp_path: Path, store_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup(tmp_path, store_url)

    def away(*_: object) -> None:
        raise RegistryUnavailable("cannot reach the registry s3://models/registry")

    monkeypatch.setattr(s.registry, "rollback", away)  # an S3 endpoint that does not answer, as botocore reports it
    response = s.client.post("/admin/rollback", headers=AUTH, json={"to": 1})
    assert response.status_code == 503 and "cannot reach" in response.json()["detail"]


def test_only_the_leading_controller_is_ready() -> None:
    # Kubernetes routes the controller Service's /admin calls to ready pods: a waiting controller answers 503.
    client = TestClient(admin_app(None, TOKEN))
    assert client.get("/readyz").status_code == 503
    client.app.state.admin = object()  # leading
    assert client.get("/readyz").json() == {"status": "ready", "role": "leader"}
