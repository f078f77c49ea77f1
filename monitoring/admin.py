"""The controller's HTTP side: /metrics for Prometheus, and token-protected /admin endpoints.

`Admin` holds what the endpoints do (a manual run, a rollback, the status); `admin_app` is only
the HTTP around it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import prometheus_client as prom
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.responses import Response

from monitoring.drift_watch import DriftWatch
from monitoring.state import ControllerState
from monitoring.trigger import Decision
from tuneloop.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotAuthenticated,
    RegistryError,
    RegistryUnavailable,
    TuneloopError,
    Unavailable,
    http_status,
)
from tuneloop.events import ModelEvent
from tuneloop.registry import Registry, Rollout
from tuneloop.runs import ACTIVE


class TriggerRequest(BaseModel):
    reason: str = Field("manual", min_length=1, max_length=500, description="Recorded with the decision and the run.")


class TriggerStarted(BaseModel):
    run_id: int
    detail: str


class ControllerStatus(BaseModel):
    running_runs: list[dict[str, Any]]  # requested (waiting for a worker) or running
    recent_runs: list[dict[str, Any]]
    recent_decisions: list[dict[str, Any]]
    consecutive_drift_windows: dict[int, int]
    live_version: int | None = Field(description="The version that serves everyone.")
    stable_version: int | None = Field(
        description="Deprecated: the same as live_version, under its previous name; removed in the next release."
    )
    rollout: Rollout | None = Field(description="The candidate in shadow or canary, if any.")


class RollbackRequest(BaseModel):
    to: int | None = Field(None, ge=1, description="Version to serve. Default: the one the live version replaced.")
    reason: str = Field("manual rollback (admin API)", min_length=1, max_length=500, description="Recorded in the history.")


class RolledBack(BaseModel):
    previous: int | None = Field(description="The version served before.")
    version: int = Field(description="The version served now; every replica swaps to it within seconds.")


NOT_JSON = "The body is not JSON"


class Refusal(BaseModel):
    detail: str = Field(description="Why the request was refused, and what to do next.")


def _refusals(described: dict[type[TuneloopError], str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI answers of a protected endpoint: its own refusals and the token's (401, 403)."""
    described = {
        NotAuthenticated: "Missing or wrong bearer token",
        Forbidden: "The admin endpoints are disabled: no controller.admin_token is set",
        Unavailable: "This controller waits while another leads on the store",
    } | (described or {})
    return {error.http_status: {"description": text, "model": Refusal} for error, text in described.items()}


class Admin:
    """The operations behind the admin endpoints, on the controller's parts."""

    def __init__(
        self, registry: Registry, state: ControllerState, drift: DriftWatch, announce: Callable[[ModelEvent], None]
    ) -> None:
        self.registry = registry
        self.state = state
        self.drift = drift
        self.announce = announce

    def request_manual(self, reason: str, timeout_s: float = 30.0) -> tuple[Decision, int | None]:
        """Ask the controller's loop for a run; returns its decision and the run id if one started."""
        return self.drift.request_manual(reason, timeout_s)

    def rollback(self, to: int | None, reason: str) -> tuple[int | None, int]:
        """Serve an earlier version again; the replicas swap to it."""
        live, target = self.registry.rollback(to, reason)
        if target != live:
            self.announce(ModelEvent(action="rollback", version=target, previous=live, reason=reason))
        return live, target

    def status(self) -> ControllerStatus:
        runs = self.state.runs()
        live = self.registry.live_version()
        return ControllerStatus(
            running_runs=[r for r in runs if r["status"] in ACTIVE],
            recent_runs=runs[-20:],
            recent_decisions=self.state.decisions(last=50),
            consecutive_drift_windows=self.drift.policy.consecutive_by_version(),
            live_version=live,
            stable_version=live,
            rollout=self.registry.rollout(),
        )


def http_error(error: TuneloopError, headers: dict[str, str] | None = None) -> HTTPException:
    """The HTTP answer to `error`: its class's status (`tuneloop.errors`), its message as the detail."""
    return HTTPException(http_status(error), str(error), headers=headers)


def admin_app(admin: Admin | None, token: str) -> FastAPI:
    """The HTTP side; `admin` is None while the controller waits for the leader to stop (`app.state.admin` is set
    when it leads): the admin endpoints answer 503 until then, /healthz and /metrics answer throughout."""
    app = FastAPI(
        title="tuneloop controller",
        description="Prometheus metrics and the admin API (bearer token: controller.admin_token).",
    )
    app.state.admin = admin
    bearer = HTTPBearer(auto_error=False)

    def leading() -> Admin:
        if app.state.admin is None:
            raise http_error(Unavailable("this controller waits while another leads on the store; ask the leader"))
        return app.state.admin

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not token:
            raise http_error(
                Forbidden("admin endpoints are disabled: set controller.admin_token (TUNELOOP_CONTROLLER__ADMIN_TOKEN)")
            )
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise http_error(NotAuthenticated("missing or wrong bearer token"), headers={"WWW-Authenticate": "Bearer"})

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(prom.generate_latest(), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="The controller process is up, leading or waiting")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "role": "waiting" if app.state.admin is None else "leader"}

    @app.get("/readyz", summary="This controller leads (503 while it waits)",
             responses={503: {"description": "This controller waits while another leads on the store"}})
    def readyz() -> dict[str, str]:
        leading()
        return {"status": "ready", "role": "leader"}

    @app.post(
        "/admin/trigger", status_code=202, response_model=TriggerStarted, dependencies=[Depends(authorized)],
        summary="Start a training run now",
        responses=_refusals(
            {InvalidRequest: NOT_JSON, Conflict: "A run is in progress", Unavailable: "The controller loop is not answering, or this controller waits while another leads"}
        ),
    )
    def trigger(request: TriggerRequest) -> TriggerStarted:
        try:
            decision, run_id = leading().request_manual(request.reason)
        except TimeoutError as exc:
            raise http_error(Unavailable(str(exc))) from None
        if run_id is None:
            raise http_error(Conflict(decision.detail))
        return TriggerStarted(run_id=run_id, detail=decision.detail)

    @app.post(
        "/admin/rollback", response_model=RolledBack, dependencies=[Depends(authorized)],
        summary="Serve an earlier version again",
        responses=_refusals(
            {InvalidRequest: NOT_JSON, Conflict: "No such version, rejected by the gate, or no earlier version to return to"}
        ),
    )
    def rollback(request: RollbackRequest) -> RolledBack:
        try:
            previous, version = leading().rollback(request.to, request.reason)
        except RegistryUnavailable as exc:  # the storage did not answer: try again later
            raise http_error(exc) from None
        except RegistryError as exc:  # every refusal, a version failing verification included, is a conflict here
            raise http_error(Conflict(str(exc))) from None
        return RolledBack(previous=previous, version=version)

    @app.get("/admin/status", response_model=ControllerStatus, dependencies=[Depends(authorized)],
             summary="Runs and trigger decisions", responses=_refusals())
    def status() -> ControllerStatus:
        return leading().status()

    return app
