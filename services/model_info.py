"""`GET /model`: the version this replica serves, its manifest summary, and the candidate beside it."""

from __future__ import annotations

import bentoml
from fastapi import FastAPI
from starlette.responses import JSONResponse

from services.follower import ModelFollower
from services.http_errors import error_response
from services.schemas import NOT_LOADED, CandidateInfo, ModelInfo
from tuneloop.errors import Unavailable

info_app = FastAPI(title="tuneloop model information", docs_url=None, redoc_url=None, openapi_url=None)


@info_app.get("/model", response_model=ModelInfo, summary="The version being served and its manifest summary")
def model_info() -> ModelInfo | JSONResponse:
    follower: ModelFollower = bentoml.get_current_service().follower
    live, candidate = follower.live, follower.candidate
    if live is None:
        return error_response(Unavailable(NOT_LOADED))
    manifest = live.manifest
    providers = getattr(live.classifier, "providers", ["torch"])
    return ModelInfo(
        version=live.version,
        backend=live.backend,
        labels=manifest.labels,
        created_at=manifest.created_at,
        parent_version=manifest.parent_version,
        base_model=manifest.base_model,
        metrics=manifest.metrics,
        quantization=manifest.export.get("quantization"),
        providers=providers,
        candidate=None if candidate is None else CandidateInfo(
            version=candidate.model.version, stage=candidate.stage, share=candidate.share
        ),
    )
