"""ASGI middleware: per-endpoint request metrics, the answering worker, a request-body size limit, JSON bodies only,
the feedback token, the model-loaded check."""

from __future__ import annotations

import hmac
import time
from typing import Any

import bentoml

from services.http_errors import send_error
from services.metrics import service_metrics
from services.schemas import NOT_LOADED
from tuneloop.errors import NotAuthenticated, RequestTooLarge, Unavailable, UnsupportedMediaType

Scope = dict[str, Any]
Message = dict[str, Any]

# Label values come only from this set, so arbitrary paths cannot grow the metric's cardinality.
ENDPOINTS = frozenset({"/predict", "/feedback", "/feedback/batch", "/model", "/livez", "/readyz", "/metrics", "/docs.json"})


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` (RequestTooLarge, 413): by Content-Length up front, else while reading them.

    A body without a length (chunked) is read here, up to the limit, and replayed to the app: the
    framework turns any error raised while it reads into a 500, so the check cannot live inside it.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body exceeds serve.max_body_bytes={self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await send_error(send, RequestTooLarge(message))
                return
            await self.app(scope, receive, send)  # the server enforces the declared length
            return
        chunks, size, more = [], 0, True
        while more:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            more = event.get("more_body", False)
            if size > self.max_bytes:
                await send_error(send, RequestTooLarge(message))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class JsonBodyMiddleware:
    """The APIs read JSON: a body declared as anything else (a form, multipart) is a 415 naming the fix.

    BentoML would try to parse it as what it claims to be, and a multipart body without its boundary
    made it answer 500. A request without a Content-Type is read as JSON, as simple clients send it."""

    APIS = frozenset({"/predict", "/feedback", "/feedback/batch"})

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.APIS:
            declared = dict(scope["headers"]).get(b"content-type", b"application/json")
            media_type = declared.split(b";")[0].strip().lower()
            if media_type != b"application/json":
                await send_error(send, UnsupportedMediaType(
                    f"{scope['path']} reads JSON, not {media_type.decode(errors='replace')!r}: "
                    "send 'Content-Type: application/json'"
                ))
                return
        await self.app(scope, receive, send)


class FeedbackTokenMiddleware:
    """With `serve.feedback_token` set, /feedback and /feedback/batch want `Authorization: Bearer <token>` (401).

    Feedback decides what the model is retrained on and how rollouts are judged: in production only
    the applications that hold the token may send it. Empty (the default, as in `make up`): open."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.token = token

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.token and scope["type"] == "http" and scope["path"] in ("/feedback", "/feedback/batch"):
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                await send_error(send, NotAuthenticated("feedback needs 'Authorization: Bearer <serve.feedback_token>'"))
                return
        await self.app(scope, receive, send)


class RequestMetricsMiddleware:
    """Count requests and time them by endpoint and status, including the ones rejected before the handler."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        started = time.perf_counter()

        async def recording_send(event: Message) -> None:
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
            await send(event)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics = service_metrics()
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)


class WorkerHeaderMiddleware:
    """Name the worker process that answered (`X-Tuneloop-Worker`, 1..serve.workers): which one misbehaves, which
    one takes the load."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.header: tuple[bytes, bytes] | None = None  # read at the first request, in the worker process

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.header is None:
            self.header = (b"x-tuneloop-worker", str(bentoml.server_context.worker_index or 1).encode())
        header = self.header

        async def naming_send(event: Message) -> None:
            if event["type"] == "http.response.start":
                event = {**event, "headers": [*event.get("headers", []), header]}
            await send(event)

        await self.app(scope, receive, naming_send)


class ModelLoadedMiddleware:
    """Answer /predict with a clear 503 (Unavailable) while no verified model is loaded, before the batcher sees it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict":
            try:
                ready = bentoml.get_current_service().live is not None
            except bentoml.exceptions.BentoMLException:  # the instance is not built yet
                ready = False
            if not ready:
                await send_error(send, Unavailable(NOT_LOADED))
                return
        await self.app(scope, receive, send)
