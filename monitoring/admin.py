"""The controller's HTTP side: /metrics for Prometheus, and token-protected /admin endpoints."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import prometheus_client as prom
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.responses import Response

from tuneloop.registry import RegistryError, Rollout

if TYPE_CHECKING:
    from monitoring.controller import Controller


class TriggerRequest(BaseModel):
    reason: str = Field("manual", min_length=1, max_length=500, description="Recorded with the decision and the run.")


class TriggerStarted(BaseModel):
    run_id: int
    detail: str


class ControllerStatus(BaseModel):
    running_runs: list[dict[str, Any]]
    recent_runs: list[dict[str, Any]]
    recent_decisions: list[dict[str, Any]]
    consecutive_drift_windows: dict[int, int]
    stable_version: int | None
    rollout: Rollout | None = Field(description="The candidate in shadow or canary, if any.")


class RollbackRequest(BaseModel):
    to: int | None = Field(None, ge=1, description="Version to serve. Default: the one the current version replaced.")
    reason: str = Field("manual rollback (admin API)", min_length=1, max_length=500, description="Recorded in the history.")


class RolledBack(BaseModel):
    previous: int | None = Field(description="The version served before.")
    version: int = Field(description="The version served now; every replica swaps to it within seconds.")


def admin_app(controller: Controller, token: str) -> FastAPI:
    app = FastAPI(
        title="tuneloop controller",
        description="Prometheus metrics and the admin API (bearer token: controller.admin_token).",
    )
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not token:
            raise HTTPException(
                403, "admin endpoints are disabled: set controller.admin_token (TUNELOOP_CONTROLLER__ADMIN_TOKEN)"
            )
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(prom.generate_latest(), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="The controller process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/admin/trigger", status_code=202, response_model=TriggerStarted, dependencies=[Depends(authorized)],
        summary="Start a training run now",
        responses={409: {"description": "A run is in progress"}, 503: {"description": "The controller loop is not running"}},
    )
    def trigger(request: TriggerRequest) -> TriggerStarted:
        try:
            decision, run_id = controller.request_manual(request.reason)
        except TimeoutError as exc:
            raise HTTPException(503, str(exc)) from None
        if run_id is None:
            raise HTTPException(409, decision.detail)
        return TriggerStarted(run_id=run_id, detail=decision.detail)

    @app.post(
        "/admin/rollback", response_model=RolledBack, dependencies=[Depends(authorized)],
        summary="Serve an earlier version again",
        responses={409: {"description": "No such version, rejected by the gate, or no earlier version to return to"}},
    )
    def rollback(request: RollbackRequest) -> RolledBack:
        try:
            previous, version = controller.rollback(request.to, request.reason)
        except RegistryError as exc:
            raise HTTPException(409, str(exc)) from None
        return RolledBack(previous=previous, version=version)

    @app.get("/admin/status", response_model=ControllerStatus, dependencies=[Depends(authorized)],
             summary="Runs and trigger decisions")
    def status() -> ControllerStatus:
        return controller.status()

    return app
