"""The one place where exceptions become HTTP status codes and OpenAI-style error bodies."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from softprompt.engine import EngineError, RequestError, TooLongError, UnknownTaskError
from softprompt.server.scheduler import QueueFullError
from softprompt.store import StoreError


class AuthError(Exception):
    """Missing or wrong admin bearer token (401), or admin disabled (403)."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


class LimitError(Exception):
    """A request over a server limit, e.g. max_tokens (400)."""


# (exception type, status, OpenAI error type); the first match wins
STATUS: list[tuple[type[BaseException], int, str]] = [
    (UnknownTaskError, 404, "not_found_error"),
    (TooLongError, 400, "invalid_request_error"),
    (LimitError, 400, "invalid_request_error"),
    (RequestError, 422, "invalid_request_error"),
    (QueueFullError, 429, "rate_limit_error"),
    (StoreError, 400, "invalid_request_error"),
]


def status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, AuthError):
        return exc.status, "authentication_error"
    for kind, status, name in STATUS:
        if isinstance(exc, kind):
            return status, name
    return 500, "server_error"


def error_body(message: str, kind: str, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def install(app, on_error) -> None:
    """Register the handlers; ``on_error(status)`` counts errors for /metrics."""

    async def engine_error(request: Request, exc: Exception) -> JSONResponse:
        status, kind = status_of(exc)
        on_error(request, status)
        message = str(exc) if status != 500 else f"internal error: {type(exc).__name__}: {exc}"
        headers = {"Retry-After": "1"} if status == 429 else ({"WWW-Authenticate": "Bearer"} if status == 401 else None)
        return JSONResponse(error_body(message, kind, status), status_code=status, headers=headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_error(request, 422)
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(error_body(problems or "invalid request", "invalid_request_error", 422), status_code=422)

    app.add_exception_handler(RequestValidationError, validation_error)
    for kind in [AuthError, EngineError, *(k for k, _, _ in STATUS)]:
        app.add_exception_handler(kind, engine_error)
    app.add_exception_handler(Exception, engine_error)  # anything else: 500 with the error, server stays up
