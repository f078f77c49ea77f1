"""The BentoML service applications call: `bentoml serve services.service:Classifier`.

`/predict` is BentoML's batchable endpoint: texts from concurrent requests are
gathered into one inference batch (adaptive batching) and each request gets its
own slice back. Every prediction names the version that served it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from starlette.responses import JSONResponse

from services.events import FeedbackRefused, FeedbackSink, PredictionPublisher, Spool
from services.live_model import LiveModel, load_live_model
from services.metrics import service_metrics
from services.middleware import BodyLimitMiddleware, RequestMetricsMiddleware, send_json_error
from tuneloop.config import load_settings
from tuneloop.bus import KafkaBus, open_bus
from tuneloop.events import FeedbackEvent
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


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Feedback items made durable.")
    spooled: int = Field(description="Of those, how many wait in the local spool for Kafka to return.")
    feedback_ids: list[str]


FeedbackBatch = Annotated[list[FeedbackEvent], Field(min_length=1, max_length=1000)]


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


def _error(ctx: bentoml.Context, status: int, message: str, detail: object = None) -> JSONResponse:
    # BentoML copies the context's status onto any response an API with a ctx parameter returns.
    ctx.response.status_code = status
    return JSONResponse({"error": message} | ({"detail": detail} if detail else {}), status_code=status)


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
        events = settings.events
        self.bus = open_bus(events)
        spool = None
        if isinstance(self.bus, KafkaBus):
            worker = bentoml.server_context.worker_index or 1  # stable across restarts, unlike a pid
            spool = Spool(events.spool_dir / f"feedback-worker{worker}.db")
            threading.Thread(target=self._ensure_topics, name="ensure-topics", daemon=True).start()
        self.feedback_sink = FeedbackSink(self.bus, events.topics.feedback, events.ack_timeout_s, spool, self.metrics)
        self.prediction_events = PredictionPublisher(
            self.bus, events.topics.predictions, events.prediction_buffer, self.metrics
        )
        # Waiting for broker acks happens here, never on the threads that run predictions.
        self._feedback_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")
        # Load before this worker takes traffic: readiness is answered by whichever worker a probe
        # reaches, so a worker that loaded later would refuse requests behind a "ready" replica.
        # Only a registry with nothing loadable leaves the worker up, unready, and retrying.
        if self._try_load():
            gc.freeze()  # the first model's objects live for good; keep full collections from rescanning them
        threading.Thread(target=self._watch_registry, name="registry-watch", daemon=True).start()

    def _ensure_topics(self) -> None:
        topics = settings.events.topics.model_dump().values()
        while True:
            try:
                self.bus.ensure_topics(topics)
                return
            except Exception as exc:  # the broker may come up after the service; keep trying
                log.warning("cannot create Kafka topics yet (%s); retrying in 5 s", exc)
                time.sleep(5)

    def _try_load(self) -> bool:
        """Load the registry's current version and swap it in; False (old model kept) when it fails."""
        previous = self.live
        started = time.perf_counter()
        try:
            live = load_live_model(self.registry, settings)
        except Exception as exc:  # the replica keeps what it serves (or stays not ready); the reason goes to the log
            self.metrics.model_load_failures.inc()
            log.warning("model not loaded (%s); serving %s", exc, f"v{previous.version}" if previous else "nothing")
            return False
        # One reference assignment: a batch already running holds the old model and finishes on it;
        # every later batch gets the new one. Responses name the version that served them.
        self.live = live
        self.metrics.model_version.set(live.version)
        self.metrics.model_loaded.set(1)
        if previous is not None:
            self.metrics.model_swaps.inc()
            self.metrics.model_swap_seconds.observe(time.perf_counter() - started)
            log.warning("swapped model v%s -> v%s in %.2f s", previous.version, live.version, time.perf_counter() - started)
        else:
            log.info("serving model v%s (%s backend)", live.version, live.backend)
        return True

    def _watch_registry(self) -> None:
        """Follow the registry's current version: promotions and rollbacks load in the background, then swap.

        A version that failed to load is retried when the pointer moves again, or after 30 s (2 s while
        the replica serves nothing yet).
        """
        failed: tuple[int | None, float] = (None, 0.0)
        while True:
            time.sleep(settings.serve.watch_interval_s)
            try:
                wanted = self.registry.current_version()
            except Exception as exc:  # a half-edited pointer file: keep serving, say why
                log.warning("cannot read the registry's current version: %s", exc)
                continue
            served = self.live.version if self.live is not None else None
            if wanted is None or wanted == served:
                continue
            backoff = 2.0 if served is None else 30.0  # a replica serving nothing keeps trying harder
            if failed[0] == wanted and time.monotonic() - failed[1] < backoff:
                continue
            if not self._try_load():
                failed = (wanted, time.monotonic())

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
        tokens = scores.tokens if scores.tokens is not None else [None] * len(texts)
        unknown = scores.unknown_tokens if scores.unknown_tokens is not None else [None] * len(texts)
        for i, (text, row) in enumerate(zip(texts, scores.probabilities, strict=True)):
            label = labels[int(row.argmax())]
            self.metrics.predictions.labels(label, str(live.version)).inc()
            prediction = Prediction(
                request_id=uuid.uuid4().hex,
                label=label,
                scores={name: round(float(p), 6) for name, p in zip(labels, row, strict=True)},
                model_version=live.version,
            )
            predictions.append(prediction)
            self.prediction_events.offer(prediction, text, (scores.sketch[i], tokens[i], unknown[i]))
        return predictions

    @bentoml.api(route="/feedback")
    async def feedback(
        self,
        ctx: bentoml.Context,
        label: str,
        request_id: str | None = None,
        text: str | None = None,
        feedback_id: str | None = None,
        source: str = "api",
    ) -> FeedbackAccepted:
        """Label a prediction (by request_id) or a text. 202 once the feedback is durable."""
        fields = {"label": label, "request_id": request_id, "text": text, "feedback_id": feedback_id, "source": source}
        try:
            event = FeedbackEvent(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            return _error(ctx, 400, "invalid feedback", exc.errors(include_url=False, include_context=False))
        return await self._accept([event], ctx)

    @bentoml.api(route="/feedback/batch")
    async def feedback_batch(self, ctx: bentoml.Context, items: FeedbackBatch) -> FeedbackAccepted:
        """Up to 1,000 feedback items at once, accepted or refused together."""
        return await self._accept(items, ctx)

    async def _accept(self, events: list[FeedbackEvent], ctx: bentoml.Context) -> FeedbackAccepted | JSONResponse:
        live = self.live
        if live is None:
            return _error(ctx, 503, NOT_LOADED)
        unknown = sorted({event.label for event in events} - set(live.manifest.labels))
        if unknown:
            return _error(ctx, 400, f"unknown label(s) {unknown}; model v{live.version} knows {live.manifest.labels}")
        messages = [(event.feedback_id.encode(), event.model_dump_json().encode()) for event in events]
        loop = asyncio.get_running_loop()
        try:
            spooled = await loop.run_in_executor(self._feedback_executor, self.feedback_sink.submit, messages)
        except FeedbackRefused as exc:
            return _error(ctx, 503, f"feedback not accepted, retry later: {exc}")
        self.metrics.feedback_accepted.labels("bus").inc(len(events) - spooled)
        self.metrics.feedback_accepted.labels("spool").inc(spooled)
        ctx.response.status_code = 202
        return FeedbackAccepted(accepted=len(events), spooled=spooled, feedback_ids=[e.feedback_id for e in events])


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
