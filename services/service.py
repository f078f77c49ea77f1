"""The BentoML service applications call: `bentoml serve services.service:Classifier`.

`/predict` is BentoML's batchable endpoint: texts from concurrent requests are
gathered into one inference batch (adaptive batching) and each request gets its
own slice back. Every prediction names the version that served it.

Each replica follows the registry: the stable version (`current`), and a candidate in
shadow (scored off the request path, never returned) or canary (answers a share of
texts). Model events on Kafka wake the follower at once; it also polls the registry,
which holds the truth, so a lost event only delays a swap.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from starlette.responses import JSONResponse

from services.events import FeedbackRefused, FeedbackSink, PredictionPublisher, Spool
from services.live_model import LiveModel, load_live_model
from services.metrics import service_metrics
from services.middleware import BodyLimitMiddleware, RequestMetricsMiddleware, send_json_error
from tuneloop.config import load_settings
from tuneloop.bus import KafkaBus, open_bus
from tuneloop.events import FeedbackEvent, ModelEvent
from tuneloop.registry import Registry, Rollout

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


class CandidateInfo(BaseModel):
    version: int
    stage: Literal["shadow", "canary"]
    share: float = Field(description="Share of texts the candidate answers (0 in shadow).")


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
    candidate: CandidateInfo | None = Field(description="A version in shadow or canary next to this one.")


NOT_LOADED = "no verified model is loaded yet; check /readyz, and run `tuneloop bootstrap` if the registry is empty"


def _unavailable() -> JSONResponse:
    return JSONResponse({"error": NOT_LOADED}, status_code=503)


def _error(ctx: bentoml.Context, status: int, message: str, detail: object = None) -> JSONResponse:
    # BentoML copies the context's status onto any response an API with a ctx parameter returns.
    ctx.response.status_code = status
    return JSONResponse({"error": message} | ({"detail": detail} if detail else {}), status_code=status)


@dataclass(frozen=True)
class Candidate:
    live: LiveModel
    stage: Literal["shadow", "canary"]
    share: float


info_app = FastAPI(title="tuneloop model information", docs_url=None, redoc_url=None, openapi_url=None)


@info_app.get("/model", response_model=ModelInfo, summary="The version being served and its manifest summary")
def model_info() -> ModelInfo | JSONResponse:
    service = bentoml.get_current_service()
    live: LiveModel | None = service.live
    if live is None:
        return _unavailable()
    candidate: Candidate | None = service.candidate
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
            version=candidate.live.version, stage=candidate.stage, share=candidate.share
        ),
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
        self.candidate: Candidate | None = None
        self.metrics = service_metrics()
        self.metrics.model_loaded.set(0)
        self._wake = threading.Event()  # set by a model event: look at the registry now
        self._rng = np.random.default_rng()
        self._shadow_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._shadow_slots = threading.BoundedSemaphore(settings.rollout.shadow_queue)
        events = settings.events
        self.bus = open_bus(events)
        spool = None
        if isinstance(self.bus, KafkaBus):
            worker = bentoml.server_context.worker_index or 1  # stable across restarts, unlike a pid
            spool = Spool(events.spool_dir / f"feedback-worker{worker}.db")
            threading.Thread(target=self._ensure_topics, name="ensure-topics", daemon=True).start()
            threading.Thread(target=self._follow_model_events, name="model-events", daemon=True).start()
        self.feedback_sink = FeedbackSink(self.bus, events.topics.feedback, events.ack_timeout_s, spool, self.metrics)
        self.prediction_events = PredictionPublisher(
            self.bus, events.topics.predictions, events.prediction_buffer, self.metrics
        )
        # Waiting for broker acks happens here, never on the threads that run predictions.
        self._feedback_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")
        # Load before this worker takes traffic: readiness is answered by whichever worker a probe
        # reaches, so a worker that loaded later would refuse requests behind a "ready" replica.
        # Only a registry with nothing loadable leaves the worker up, unready, and retrying.
        self._failed: dict[int, float] = {}  # version -> when it last failed to load
        try:
            self._follow_registry()
        except Exception as exc:  # an unreadable pointer: stay up and unready; the watch retries
            log.warning("cannot follow the registry: %s", exc)
        if self.live is not None:
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

    def _follow_model_events(self) -> None:
        """Wake the registry follower on every model event; reconnect whenever the broker goes away."""
        topic = settings.events.topics.model
        while True:
            try:
                consumer = self.bus.tail(topic)
                try:
                    while True:
                        for record in consumer.poll(max_records=50, timeout_s=1.0):
                            try:
                                event = ModelEvent.model_validate_json(record.value)
                                log.info("model event: %s v%s (%s)", event.action, event.version, event.reason)
                            except ValidationError:
                                log.warning("ignored a malformed message on %s", topic)
                            self._wake.set()
                finally:
                    consumer.close()
            except Exception as exc:  # the registry poll still finds every change
                log.warning("model events unavailable (%s); polling the registry meanwhile, retrying in 5 s", exc)
                time.sleep(5)

    def _load(self, version: int) -> LiveModel | None:
        """Load a version in the background; None (and the reason in the log) when it fails."""
        backoff = 2.0 if self.live is None else 30.0  # a replica serving nothing keeps trying harder
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < backoff:
            return None
        try:
            live = load_live_model(self.registry, settings, version)
        except Exception as exc:  # the replica keeps what it serves (or stays not ready)
            self._failed[version] = time.monotonic()
            self.metrics.model_load_failures.inc()
            served = f"v{self.live.version}" if self.live else "nothing"
            log.warning("model v%s not loaded (%s); serving %s", version, exc, served)
            return None
        self._failed.pop(version, None)
        return live

    def _follow_registry(self) -> None:
        """Make this replica serve what the registry says: the stable version, and the candidate if any."""
        wanted = self.registry.current_version()
        rollout = self.registry.rollout()
        if wanted is not None and (self.live is None or self.live.version != wanted):
            self._swap_stable(wanted)
        self._follow_candidate(rollout)

    def _swap_stable(self, version: int) -> None:
        previous = self.live
        started = time.perf_counter()
        candidate = self.candidate
        # A promoted candidate is loaded and warm already: swap to it without loading again.
        live = candidate.live if candidate is not None and candidate.live.version == version else self._load(version)
        if live is None:
            return
        # One reference assignment: a batch already running holds the old model and finishes on it;
        # every later batch gets the new one. Responses name the version that served them.
        self.live = live
        self.metrics.model_version.set(live.version)
        self.metrics.model_loaded.set(1)
        if previous is None:
            log.info("serving model v%s (%s backend)", live.version, live.backend)
            return
        took = time.perf_counter() - started
        self.metrics.model_swaps.inc()
        self.metrics.model_swap_seconds.observe(took)
        log.warning("swapped model v%s -> v%s in %.2f s", previous.version, live.version, took)

    def _follow_candidate(self, rollout: Rollout | None) -> None:
        current = self.candidate
        if rollout is None or (self.live is not None and rollout.version == self.live.version):
            if current is not None:
                self.candidate = None
                self.metrics.candidate_version.labels(current.stage).set(0)
                log.warning("candidate v%s withdrawn from %s", current.live.version, current.stage)
            return
        if current is not None and current.live.version == rollout.version:
            if (current.stage, current.share) != (rollout.stage, rollout.share):
                self.candidate = replace(current, stage=rollout.stage, share=rollout.share)
                self.metrics.candidate_version.labels(current.stage).set(0)
                self.metrics.candidate_version.labels(rollout.stage).set(rollout.version)
                log.warning("candidate v%s: %s -> %s", rollout.version, current.stage, rollout.stage)
            return
        live = self._load(rollout.version)
        if live is None:
            return
        self.candidate = Candidate(live, rollout.stage, rollout.share)
        if current is not None:
            self.metrics.candidate_version.labels(current.stage).set(0)
        self.metrics.candidate_version.labels(rollout.stage).set(rollout.version)
        log.warning("candidate v%s in %s (share %.2f)", rollout.version, rollout.stage, rollout.share)

    def _watch_registry(self) -> None:
        """Follow the registry: promotions, rollbacks and rollout stages load in the background, then swap.

        A version that failed to load is retried after 30 s (2 s while the replica serves nothing yet).
        """
        while True:
            self._wake.wait(timeout=settings.serve.watch_interval_s)
            self._wake.clear()
            try:
                self._follow_registry()
            except Exception as exc:  # a half-edited pointer or rollout file: keep serving, say why
                log.warning("cannot follow the registry: %s", exc)

    def __is_ready__(self) -> bool:
        return self.live is not None

    @bentoml.api(
        route="/predict", batchable=True, max_batch_size=limits.max_batch_size, max_latency_ms=limits.max_latency_ms
    )
    def predict(self, texts: Texts) -> list[Prediction]:
        """Classify texts: one prediction per text, in order. Quote a prediction's request_id in feedback."""
        live, candidate = self.live, self.candidate
        if live is None:  # only between a failed load and the gate's check; the gate answers the usual case
            raise bentoml.exceptions.ServiceUnavailable(NOT_LOADED)
        self.metrics.batch_texts.observe(len(texts))
        if candidate is not None and candidate.stage == "canary":
            routed = np.flatnonzero(self._rng.random(len(texts)) < candidate.share)
            if len(routed):
                return self._predict_canary(live, candidate.live, texts, routed)
        predictions = self._classify(live, texts)
        if candidate is not None and candidate.stage == "shadow":
            self._shadow(candidate.live, texts, predictions)
        return predictions

    def _classify(
        self, live: LiveModel, texts: list[str], request_ids: list[str] | None = None, shadow: bool = False
    ) -> list[Prediction]:
        """Score texts with one model and publish a prediction event per text."""
        started = time.perf_counter()
        scores = live.classifier.predict(texts)
        if not shadow:
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
        labels = live.manifest.labels
        predictions = []
        tokens = scores.tokens if scores.tokens is not None else [None] * len(texts)
        unknown = scores.unknown_tokens if scores.unknown_tokens is not None else [None] * len(texts)
        for i, (text, row) in enumerate(zip(texts, scores.probabilities, strict=True)):
            label = labels[int(row.argmax())]
            if shadow:
                self.metrics.shadow_predictions.labels(str(live.version)).inc()
            else:
                self.metrics.predictions.labels(label, str(live.version)).inc()
            prediction = Prediction(
                request_id=request_ids[i] if request_ids else uuid.uuid4().hex,
                label=label,
                scores={name: round(float(p), 6) for name, p in zip(labels, row, strict=True)},
                model_version=live.version,
            )
            predictions.append(prediction)
            self.prediction_events.offer(prediction, text, (scores.sketch[i], tokens[i], unknown[i]), shadow)
        return predictions

    def _predict_canary(
        self, stable: LiveModel, canary: LiveModel, texts: list[str], routed: np.ndarray
    ) -> list[Prediction]:
        """The canary answers the routed texts and the stable version the rest; a canary failure falls back."""
        rest = np.setdiff1d(np.arange(len(texts)), routed)
        answers: list[Prediction | None] = [None] * len(texts)
        try:
            for i, prediction in zip(routed, self._classify(canary, [texts[i] for i in routed]), strict=True):
                answers[i] = prediction
        except Exception:
            self.metrics.candidate_failures.labels("canary").inc()
            log.exception("canary v%s failed a batch; the stable version answers it", canary.version)
            rest = np.arange(len(texts))
        if len(rest):
            for i, prediction in zip(rest, self._classify(stable, [texts[i] for i in rest]), strict=True):
                answers[i] = prediction
        return answers  # type: ignore[return-value]  # every slot is filled above

    def _shadow(self, candidate: LiveModel, texts: list[str], served: list[Prediction]) -> None:
        """Score the batch with the candidate off the request path; skipped (counted) when it falls behind."""
        if not self._shadow_slots.acquire(blocking=False):
            self.metrics.shadow_skipped.inc(len(texts))
            return

        def score() -> None:
            try:
                self._classify(candidate, texts, [p.request_id for p in served], shadow=True)
            except Exception:
                self.metrics.candidate_failures.labels("shadow").inc()
                log.exception("shadow v%s failed a batch", candidate.version)
            finally:
                self._shadow_slots.release()

        self._shadow_executor.submit(score)

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
