"""The one place where exceptions become HTTP status codes and OpenAI-style error bodies.

Every error, ours or the framework's (unknown path 404, wrong method 405, body too large 413, invalid
JSON 422), answers ``{"error": {"message", "type", "param", "code"}}``. An unexpected exception answers 500 in
that shape too and keeps the client's keep-alive connection: it is caught in :class:`CatchAll` instead of
Starlette's outermost handler, which re-raises after responding (uvicorn then drops the connection).
"""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from softprompt.engine import ChatLayoutError, EngineError, RequestError, TooLongError, UnknownTaskError
from softprompt.server.scheduler import OverShareError, QueueFullError
from softprompt.store import StoreError

log = logging.getLogger("softprompt.server")

UNMATCHED = "unmatched"  # the metrics label of a path that no route serves


class AuthError(Exception):
    """Missing or wrong admin bearer token (401), or admin disabled (403)."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


class LimitError(Exception):
    """A request over a server limit, e.g. max_tokens (400)."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready (logged as 499; nobody reads the response)."""


# (exception type, status, OpenAI error type); the first match wins
STATUS: list[tuple[type[BaseException], int, str]] = [
    (UnknownTaskError, 404, "not_found_error"),
    (TooLongError, 400, "invalid_request_error"),
    (ChatLayoutError, 400, "invalid_request_error"),
    (LimitError, 400, "invalid_request_error"),
    (RequestError, 422, "invalid_request_error"),
    (QueueFullError, 429, "rate_limit_error"),
    (OverShareError, 400, "invalid_request_error"),
    (StoreError, 400, "invalid_request_error"),
    (ClientGone, 499, "client_closed_request"),
]
HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
              413: "request_too_large", 429: "rate_limit_error"}


def status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, AuthError):
        return exc.status, "authentication_error"
    if isinstance(exc, HTTPException):
        return exc.status_code, HTTP_TYPES.get(exc.status_code, "invalid_request_error")
    for kind, status, name in STATUS:
        if isinstance(exc, kind):
            return status, name
    return 500, "server_error"


def error_body(message: str, kind: str, status: int) -> dict:
    """OpenAI's error shape: ``param`` null and ``code`` a string (the HTTP status as text), as typed clients
    read them (an integer ``code`` and no ``param`` failed to parse in clients that declare them strings)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


def message_of(exc: BaseException, status: int) -> str:
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    return str(exc) if status != 500 else f"internal error: {type(exc).__name__}: {exc}"


def route_label(app, scope) -> str:
    """The route template serving ``scope`` (``/admin/tasks/{name}/load``), never the raw path."""
    route = scope.get("route")
    if route is None:
        for candidate in getattr(app, "routes", []):
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
    return getattr(route, "path", None) or UNMATCHED


def install(app, on_error) -> None:
    """Register the handlers and the catch-all middleware; ``on_error(scope, status)`` counts errors."""

    async def known_error(request: Request, exc: Exception) -> JSONResponse:
        status, kind = status_of(exc)
        on_error(request.scope, status)
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 429:
            headers["Retry-After"] = "1"
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error_body(message_of(exc, status), kind, status), status_code=status,
                            headers=headers or None)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_error(request.scope, 422)
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(error_body(problems or "invalid request", "invalid_request_error", 422), status_code=422)

    app.add_exception_handler(RequestValidationError, validation_error)
    for kind in [AuthError, EngineError, HTTPException, *(k for k, _, _ in STATUS)]:
        app.add_exception_handler(kind, known_error)
    app.add_middleware(CatchAll, on_error=on_error)


async def send_error(send, status: int, message: str, kind: str) -> None:
    """A complete JSON error response through a raw ASGI ``send``."""
    body = json.dumps(error_body(message, kind, status)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class CatchAll:
    """ASGI middleware: an exception no handler took answers a JSON 500 and is not re-raised.

    Re-raising (what Starlette's own ``Exception`` handler does) makes uvicorn close the connection; a
    keep-alive client would lose it for one bad request.
    """

    def __init__(self, app, on_error):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - answered here so the server and the connection stay up
            status, kind = status_of(exc)
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, exc,
                      exc_info=exc)
            self.on_error(scope, status)
            if not started:
                await send_error(send, status, message_of(exc, status), kind)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413 before it is parsed.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is counted as it
    arrives and refused when it passes the limit.
    """

    def __init__(self, app, max_bytes: int, on_error):
        self.app, self.max_bytes, self.on_error = app, max_bytes, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            self.on_error(scope, 413)
            await send_error(send, 413, too_large, HTTP_TYPES[413])
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counting_receive, send)
