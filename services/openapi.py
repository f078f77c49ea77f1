"""The service's OpenAPI document (`GET /docs.json`): BentoML's, completed with what the service answers.

BentoML documents every API as 200, 400, 404 and 500 with its own error body, and the /feedback
body as the handler's plain arguments. The service answers more than that: 202 once feedback is
durable, 401 without the feedback token, 413 for a body over the limit, 415 for a body that is not
JSON, 503 while no model is loaded or Kafka and the spool cannot take feedback; its error body is
`{"error", "detail"}` where the detail may be a list of validation errors. Clients generated from the document, and the
schemathesis run in the tests, see what the service does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

Scope = dict[str, Any]

ERROR = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, and what to do next."},
        "detail": {"description": "Validation errors or the refused keys, when there are any."},
    },
}
ERRORS = {
    400: "The body is not valid: which field, and why",
    401: "Feedback without `Authorization: Bearer <serve.feedback_token>` (only when the token is set)",
    413: "The body or a text is over its limit (serve.max_body_bytes, the bus's message size)",
    415: "The body is not declared as JSON (Content-Type: application/json)",
    503: "No verified model is loaded yet, or feedback cannot be made durable now: retry later",
}
# The statuses each operation can answer besides its success; BentoML's 404 and 500 are not among them.
ANSWERS: dict[tuple[str, str], tuple[int, ...]] = {
    ("/predict", "post"): (400, 413, 415, 503),
    ("/feedback", "post"): (400, 401, 413, 415, 503),
    ("/feedback/batch", "post"): (400, 401, 413, 415, 503),
    ("/model", "get"): (503,),
    ("/readyz", "get"): (503,),
}
ACCEPTED = ("/feedback", "/feedback/batch")


def _error_response(status: int) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": ERRORS[status], "content": {"application/json": {"schema": schema}}}


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """BentoML's generated `spec` with tuneloop's statuses, error body and /feedback body."""
    spec = copy.deepcopy(spec)
    spec["components"]["schemas"]["Error"] = ERROR
    for (path, method), statuses in ANSWERS.items():
        operation = spec["paths"][path][method]
        responses = {str(k): v for k, v in operation["responses"].items() if str(k).startswith("2")}
        if path in ACCEPTED:  # durable feedback is answered 202 Accepted, not 200
            responses = {"202": {**responses.pop("200"), "description": "Accepted: the feedback is durable"}}
        operation["responses"] = responses | {str(status): _error_response(status) for status in statuses}
    # /feedback takes one FeedbackEvent, the schema its handler validates against.
    spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
        "$ref": "#/components/schemas/FeedbackEvent"
    }
    return spec


class OpenApiMiddleware:
    """Answer `GET /docs.json` (BentoML's Swagger UI reads it too) with the completed document."""

    def __init__(self, app: Any, spec: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.spec = spec
        self.body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        if self.body is None:
            self.body = json.dumps(complete(self.spec())).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})
