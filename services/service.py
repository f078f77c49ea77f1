"""The BentoML service applications call: `bentoml serve services.service:Classifier`.

`/predict` runs through `services.batcher`: the requests that arrive while the model
is busy run together in its next batch, and each request gets its own slice back.
Every prediction names the version that served it.

`Classifier` wires the parts together and delegates to them:

- `services.schemas`: what the API takes and returns;
- `services.batcher`: which requests share an inference batch, and load shedding;
- `services.follower`: which versions this replica serves (the registry, model events, swaps);
- `services.routing`: which of them answers a text (live, canary, shadow);
- `services.feedback_intake`: feedback made durable before the 202;
- `services.prediction_events`: a prediction event per score, off the request path;
- `services.model_info` (`GET /model`), `services.openapi` (`GET /docs.json`) and `services.middleware`.

On shutdown it stops what it started and publishes the prediction events still queued.
"""

from __future__ import annotations

import logging
import threading
import time

import bentoml
from pydantic import TypeAdapter, ValidationError
from starlette.responses import JSONResponse, Response

from services.batcher import Batcher
from services.feedback_intake import FeedbackIntake
from services.follower import Candidate, ModelFollower
from services.http_errors import error_response
from services.live_model import LiveModel
from services.metrics import service_metrics
from services.middleware import (
    BodyLimitMiddleware,
    FeedbackTokenMiddleware,
    JsonBodyMiddleware,
    ModelLoadedMiddleware,
    RequestMetricsMiddleware,
    WorkerHeaderMiddleware,
)
from services.model_info import info_app
from services.openapi import OpenApiMiddleware
from services.prediction_events import PredictionPublisher
from services.routing import Router
from services.schemas import NOT_LOADED, FeedbackAccepted, FeedbackBatch, Prediction, Texts
from services.settings import limits, settings
from services.spool import Spool, SpooledSink
from tuneloop.bus import Bus, KafkaBus, open_bus
from tuneloop.errors import FeedbackRefused, InvalidRequest, RequestTooLarge, TuneloopError, Unavailable, http_status
from tuneloop.events import FeedbackEvent
from tuneloop.registry import Registry

log = logging.getLogger("tuneloop.service")

__all__ = ["Classifier", "settings"]

PREDICTIONS = TypeAdapter(list[Prediction])
SHUTDOWN_S = 10.0  # what a worker may spend stopping (Kubernetes waits 30 s by default before it kills)


def _error(ctx: bentoml.Context, error: TuneloopError, detail: object = None) -> JSONResponse:
    # BentoML copies the context's status onto any response an API with a ctx parameter returns.
    ctx.response.status_code = http_status(error)
    return error_response(error, detail)


def _ensure_topics(bus: Bus, stopped: threading.Event) -> None:
    topics = settings.events.topics.model_dump().values()
    while not stopped.is_set():
        try:
            bus.ensure_topics(topics)
            return
        except Exception as exc:  # the broker may come up after the service; keep trying
            log.warning("cannot create Kafka topics yet (%s); retrying in 5 s", exc)
            stopped.wait(5)


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="tuneloop",
    workers=limits.workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": limits.access_log}},
)
class Classifier:
    def __init__(self) -> None:
        self.metrics = service_metrics()
        self.metrics.model_loaded.set(0)
        self.follower = ModelFollower(Registry.from_config(settings.registry), settings, self.metrics)
        events = settings.events
        self.bus = open_bus(events)
        self._stopped = threading.Event()
        topics, metrics = events.topics, self.metrics
        feedback_spool = prediction_spool = None  # the embedded log's commit is already local and durable
        if isinstance(self.bus, KafkaBus):
            worker = bentoml.server_context.worker_index or 1  # stable across restarts, unlike a pid
            feedback_spool = Spool(events.spool_dir / f"feedback-worker{worker}.db")
            prediction_spool = Spool(events.spool_dir / f"predictions-worker{worker}.db")
            threading.Thread(target=_ensure_topics, args=(self.bus, self._stopped), name="ensure-topics", daemon=True).start()
            self.follower.listen(self.bus, topics.model)
        self.feedback_intake = FeedbackIntake(
            SpooledSink(self.bus, topics.feedback, topics.dead_letter, events.ack_timeout_s, feedback_spool,
                        metrics.feedback_spooled, metrics.feedback_replayed),
            metrics,
        )
        self.prediction_events = PredictionPublisher(
            SpooledSink(self.bus, topics.predictions, topics.dead_letter, events.ack_timeout_s, prediction_spool,
                        metrics.prediction_events_spooled, metrics.prediction_events_replayed),
            events.prediction_buffer, metrics,
        )
        self.router = Router(self.prediction_events, self.metrics, settings.rollout.shadow_queue)
        self.batcher = Batcher(self._infer, limits.max_batch_size, limits.max_latency_ms / 1000)
        # Load before this worker takes traffic: readiness is answered by whichever worker a probe
        # reaches, so a worker that loaded later would refuse requests behind a "ready" replica.
        # Only a registry with nothing loadable leaves the worker up, unready, and retrying.
        self.follower.follow_once()
        self.follower.watch()

    @property
    def live(self) -> LiveModel | None:
        """The live version this replica serves (None until one loads)."""
        return self.follower.live

    @property
    def candidate(self) -> Candidate | None:
        """A version in shadow or canary beside it."""
        return self.follower.candidate

    def __is_ready__(self) -> bool:
        return self.live is not None

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        """Stop following and feeding; publish the prediction events still queued, then close the bus.

        Waits are bounded (SHUTDOWN_S in all, give or take a feedback submission in flight), so a bus
        that does not answer cannot hold the worker's exit.
        """
        started = time.perf_counter()

        def left() -> float:
            return max(0.5, SHUTDOWN_S - (time.perf_counter() - started))

        self._stopped.set()
        self.batcher.close()
        self.follower.stop(timeout_s=left())
        self.router.close()
        self.feedback_intake.close(timeout_s=left())
        self.prediction_events.close(timeout_s=left())
        try:
            self.bus.close()
        except Exception as exc:  # the process is going anyway; say why the bus did not close cleanly
            log.warning("event bus not closed cleanly: %s", exc)
        log.info("service stopped in %.2f s", time.perf_counter() - started)

    @bentoml.api(route="/predict")
    async def predict(self, ctx: bentoml.Context, texts: Texts) -> list[Prediction]:
        """Classify texts: one prediction per text, in order. Quote a prediction's request_id in feedback."""
        try:
            predictions = await self.batcher.submit(texts)
        except Unavailable as exc:
            return _error(ctx, exc)
        # Serialized here: BentoML would rebuild the output's JSON schema for every response (a third of the
        # event loop's time under load, measured with py-spy).
        return Response(PREDICTIONS.dump_json(predictions), media_type="application/json")

    def _infer(self, texts: list[str]) -> list[Prediction]:
        """One inference batch, on the batcher's thread: the versions it runs on are read once, for all of it."""
        live, candidate = self.follower.live, self.follower.candidate
        if live is None:  # only between a failed load and the middleware's check, which answers the usual case
            raise Unavailable(NOT_LOADED)
        self.metrics.batch_texts.observe(len(texts))
        return self.router.predict(live, candidate, texts)

    @bentoml.api(route="/feedback")
    async def feedback(
        self,
        ctx: bentoml.Context,
        label: str,
        request_id: str | None = None,
        text: str | None = None,
        feedback_id: str | None = None,
        source: str = "api",
        timestamp: str | None = None,
    ) -> FeedbackAccepted:
        """Label a prediction (by request_id) or a text. 202 once the feedback is durable."""
        fields = {
            "label": label, "request_id": request_id, "text": text, "feedback_id": feedback_id, "source": source,
            "timestamp": timestamp,
        }
        try:
            event = FeedbackEvent(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            return _error(ctx, InvalidRequest("invalid feedback"), exc.errors(include_url=False, include_context=False))
        return await self._accept([event], ctx)

    @bentoml.api(route="/feedback/batch")
    async def feedback_batch(self, ctx: bentoml.Context, items: FeedbackBatch) -> FeedbackAccepted:
        """Up to 1,000 feedback items at once, accepted or refused together."""
        return await self._accept(items, ctx)

    async def _accept(self, events: list[FeedbackEvent], ctx: bentoml.Context) -> FeedbackAccepted | JSONResponse:
        live = self.live
        if live is None:
            return _error(ctx, Unavailable(NOT_LOADED))
        unknown = self.feedback_intake.unknown_labels(events, live)
        if unknown:
            return _error(ctx, InvalidRequest(unknown))
        try:
            accepted = await self.feedback_intake.submit(events)
        except RequestTooLarge as exc:
            return _error(ctx, exc)
        except FeedbackRefused as exc:
            return _error(ctx, FeedbackRefused(f"feedback not accepted, retry later: {exc}"))
        ctx.response.status_code = 202
        return accepted


# First added is outermost: count every request and name its worker, answer /docs.json, then refuse oversized
# bodies, bodies that are not JSON and feedback without its token, then check a model is loaded.
Classifier.add_asgi_middleware(RequestMetricsMiddleware)
Classifier.add_asgi_middleware(WorkerHeaderMiddleware)
Classifier.add_asgi_middleware(OpenApiMiddleware, spec=lambda: Classifier.openapi_spec.asdict())
Classifier.add_asgi_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
Classifier.add_asgi_middleware(JsonBodyMiddleware)
Classifier.add_asgi_middleware(FeedbackTokenMiddleware, token=limits.feedback_token.get_secret_value())
Classifier.add_asgi_middleware(ModelLoadedMiddleware)
