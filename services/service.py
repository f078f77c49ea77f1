"""The BentoML service applications call: `bentoml serve services.service:Classifier`.

`/predict` is BentoML's batchable endpoint: texts from concurrent requests are
gathered into one inference batch (adaptive batching) and each request gets its
own slice back. Every prediction names the version that served it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI
from pydantic import BaseModel, Field, StringConstraints
from starlette.responses import JSONResponse

from services.live_model import LiveModel, load_live_model
from services.metrics import service_metrics
from services.middleware import BodyLimitMiddleware, RequestMetricsMiddleware, send_json_error
from tuneloop.config import load_settings
from tuneloop.registry import Registry

log = logging.getLogger("tuneloop.service")
settings = load_settings()
limits = settings.serve

Text = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_chars_per_text)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_texts_per_request)]


class Prediction(BaseModel):
    request_id: str = Field(description="Identifies this prediction; send it back with feedback.")
    label: str
    scores: dict[str, float] = Field(description="Probability per label; they sum to 1.")
    model_version: int = Field(description="Registry version that served this text.")


class ModelInfo(BaseModel):
    version: int
    backend: str
    labels: list[str]
    created_at: str
    parent_version: int | None
    base_model: str
    metrics: dict[str, object]
    quantization: str | None
    providers: list[str]


NOT_LOADED = "no verified model is loaded yet; check /readyz, and run `tuneloop bootstrap` if the registry is empty"


def _unavailable() -> JSONResponse:
    return JSONResponse({"error": NOT_LOADED}, status_code=503)


info_app = FastAPI(title="tuneloop model information", docs_url=None, redoc_url=None, openapi_url=None)


@info_app.get("/model", response_model=ModelInfo, summary="The version being served and its manifest summary")
def model_info() -> ModelInfo | JSONResponse:
    live: LiveModel | None = bentoml.get_current_service().live
    if live is None:
        return _unavailable()
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
    )


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="tuneloop",
    workers=limits.workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": limits.access_log}},
)
class Classifier:
    def __init__(self) -> None:
        self.registry = Registry(settings.registry.path)
        self.live: LiveModel | None = None
        self.metrics = service_metrics()
        self.metrics.model_loaded.set(0)
        threading.Thread(target=self._load_until_ready, name="model-loader", daemon=True).start()

    def _load_until_ready(self) -> None:
        """Retry until a verified version loads, so a replica started before bootstrap comes up by itself."""
        while self.live is None:
            try:
                live = load_live_model(self.registry, settings)
            except Exception as exc:  # any failure leaves the replica not ready; the reason goes to the log
                self.metrics.model_load_failures.inc()
                log.warning("model not loaded (%s); retrying in 2 s", exc)
                time.sleep(2)
                continue
            gc.freeze()  # the loaded model's objects live for good; keep full collections from rescanning them
            self.live = live
            self.metrics.model_version.set(live.version)
            self.metrics.model_loaded.set(1)
            log.info("serving model v%s (%s backend)", live.version, live.backend)

    def __is_ready__(self) -> bool:
        return self.live is not None

    @bentoml.api(
        route="/predict", batchable=True, max_batch_size=limits.max_batch_size, max_latency_ms=limits.max_latency_ms
    )
    def predict(self, texts: Texts) -> list[Prediction]:
        """Classify texts: one prediction per text, in order. Quote a prediction's request_id in feedback."""
        live = self.live
        if live is None:  # only between a failed load and the gate's check; the gate answers the usual case
            raise bentoml.exceptions.ServiceUnavailable(NOT_LOADED)
        started = time.perf_counter()
        scores = live.classifier.predict(texts)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_texts.observe(len(texts))
        labels = live.manifest.labels
        predictions = []
        for row in scores.probabilities:
            label = labels[int(row.argmax())]
            self.metrics.predictions.labels(label, str(live.version)).inc()
            predictions.append(
                Prediction(
                    request_id=uuid.uuid4().hex,
                    label=label,
                    scores={name: round(float(p), 6) for name, p in zip(labels, row, strict=True)},
                    model_version=live.version,
                )
            )
        return predictions


class ModelGateMiddleware:
    """Answer /predict with a clear 503 while no verified model is loaded, before the batcher sees it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict":
            try:
                ready = bentoml.get_current_service().live is not None
            except bentoml.exceptions.BentoMLException:  # the instance is not built yet
                ready = False
            if not ready:
                await send_json_error(send, 503, NOT_LOADED)
                return
        await self.app(scope, receive, send)


# First added is outermost: count every request, then refuse oversized bodies, then gate on the model.
Classifier.add_asgi_middleware(RequestMetricsMiddleware)
Classifier.add_asgi_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
Classifier.add_asgi_middleware(ModelGateMiddleware)
