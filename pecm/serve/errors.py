"""Errors of `pecm serve` as JSON, and the request-body reader.

Every error response is ``{"error": "<field>: <what is wrong>", "field": "<field>"}`` (``field`` is null when
no single field is at fault) with a 4xx status for bad input; the exception handlers installed by
`install_handlers` turn anything else into JSON too (500 only for a genuine bug, logged with its traceback).
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

log = logging.getLogger("pecm.serve")


class APIError(Exception):
    """A client error: ``status`` (4xx), the offending ``field`` (or None) and a message starting with it."""

    def __init__(self, status: int, field: Optional[str], message: str):
        super().__init__(message)
        self.status, self.field, self.message = int(status), field, message


def bad(field: Optional[str], what: str, status: int = 422) -> APIError:
    """An `APIError` whose message names ``field`` ("k: expected an int in [1, 1000], got 0")."""
    return APIError(status, field, f"{field}: {what}" if field else what)


def from_exception(e: BaseException, field: Optional[str] = None) -> APIError:
    """A ValueError / TypeError / KeyError of the index or the encoder as a 422 (404 for KeyError: an unknown
    or deleted id). Their messages already start with the argument they name (``where: ...``)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    status = 404 if isinstance(e, KeyError) else 422
    if field and not msg.startswith(field):
        msg = f"{field}: {msg}"
    name = field or (msg.split(":", 1)[0] if ":" in msg and " " not in msg.split(":", 1)[0] else None)
    return APIError(status, name, msg)


def error_response(status: int, message: str, field: Optional[str] = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object: 413 past ``limit`` bytes (announced or streamed), 400 for anything
    that is not one JSON object (NaN / Infinity included)."""
    n = request.headers.get("content-length")
    if n is not None:
        if not n.isdigit():
            raise APIError(400, "content-length", f"content-length: expected a byte count, got {n!r}")
        if int(n) > limit:
            raise APIError(413, "body", f"body: {int(n)} bytes exceeds the limit of {limit} bytes (--max-body)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, "body", f"body: exceeds the limit of {limit} bytes (--max-body)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "body", "body: the client disconnected before sending it") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "body", "body: expected a JSON object, got an empty body")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, "body", f"body: malformed JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "body", f"body: expected a JSON object, got {type(body).__name__}")
    return body


def install_handlers(app) -> None:
    """JSON for `APIError`, Starlette's HTTP errors (404 route, 405 method) and anything unexpected."""

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return error_response(e.status, e.message, e.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        field = "path" if e.status_code == 404 else "method" if e.status_code == 405 else None
        what = {404: f"no route {request.url.path}", 405: f"{request.method} not allowed on {request.url.path}"}
        msg = f"{field}: {what[e.status_code]}" if field else str(e.detail)
        return error_response(e.status_code, msg, field, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("pecm serve: unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")
