"""Errors as HTTP answers: the status from the exception's class (`tuneloop.errors`), the body `{"error": ...}`.

Every error response the service sends is built here, by the handlers (`error_response`) and by the
ASGI middleware before a handler runs (`send_error`); no status is chosen anywhere else.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from tuneloop.errors import TuneloopError, http_status


def error_body(error: TuneloopError, detail: object = None) -> dict[str, Any]:
    return {"error": str(error)} | ({"detail": detail} if detail else {})


def error_response(error: TuneloopError, detail: object = None) -> JSONResponse:
    return JSONResponse(error_body(error, detail), status_code=http_status(error))


async def send_error(send: Any, error: TuneloopError) -> None:
    """Answer at the ASGI level, before (or instead of) the app."""
    body = json.dumps(error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": http_status(error), "headers": headers})
    await send({"type": "http.response.body", "body": body})
