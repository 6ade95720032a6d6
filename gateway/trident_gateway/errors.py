"""The gateway's error answers: {"error": {"code": ..., "message": ...}}, and the trident client's exceptions
mapped onto HTTP statuses."""
from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trident.errors import InvalidInputError, ServerUnavailableError, TridentError

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    """An answer other than 2xx, raised anywhere in a request."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _timed_out(exc: BaseException) -> bool:
    # trident's ServerUnavailableError covers unreachable and timed out alike: the tritonclient error it was
    # raised from tells them apart.
    cause = exc.__cause__
    if isinstance(cause, (asyncio.TimeoutError, TimeoutError)):
        return True
    status = getattr(cause, "status", None)
    return "DEADLINE_EXCEEDED" in str((status() if callable(status) else status) or "")


def from_trident(exc: TridentError, retry_after: int) -> ApiError:
    """The HTTP answer to one of the trident client's exceptions."""
    if isinstance(exc, InvalidInputError):
        return ApiError(400, "invalid_input", str(exc))
    if isinstance(exc, ServerUnavailableError):
        if _timed_out(exc):
            return ApiError(504, "timeout", str(exc))
        # unreachable, not ready, or its queue is full (Triton: UNAVAILABLE): worth trying again later
        return ApiError(503, "unavailable", str(exc), {"Retry-After": str(retry_after)})
    return ApiError(502, "upstream_error", str(exc))


def install(app) -> None:
    """Every error of `app` in the gateway's JSON shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(400, "invalid_parameter", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, STATUS_CODES.get(exc.status_code, "error"), str(exc.detail),
                              dict(exc.headers or {}))
