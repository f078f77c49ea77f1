"""ASGI middleware: a request-body size limit and per-endpoint request metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from services.metrics import service_metrics

Scope = dict[str, Any]
Message = dict[str, Any]

# Label values come only from this set, so arbitrary paths cannot grow the metric's cardinality.
ENDPOINTS = frozenset({"/predict", "/model", "/livez", "/readyz", "/metrics", "/docs.json"})


class BodyTooLarge(Exception):
    pass


async def send_json_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` with 413, by Content-Length up front or while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body exceeds serve.max_body_bytes={self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json_error(send, 413, message)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return event

        async def tracking_send(event: Message) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_json_error(send, 413, message)


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
