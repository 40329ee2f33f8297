"""Alpaca-style error bodies `{"code": int, "message": str}` for every error a service answers.

FastAPI's `{"detail": ...}` never reaches a client: HTTPException, request validation errors, malformed
JSON and unexpected exceptions are all mapped here.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from papertrade.errors import ValidationError

_log = structlog.get_logger("papertrade.errors")


class ErrorCode(IntEnum):
    MALFORMED = 40010000
    UNAUTHORIZED = 40110000
    FORBIDDEN = 40310000
    NOT_FOUND = 40410000
    METHOD_NOT_ALLOWED = 40510000
    CONFLICT = 40910000
    UNPROCESSABLE = 42210000
    THROTTLED = 42910000
    INTERNAL = 50010000
    UNAVAILABLE = 50310000


_STATUS_CODES = {
    400: ErrorCode.MALFORMED,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    422: ErrorCode.UNPROCESSABLE,
    429: ErrorCode.THROTTLED,
    500: ErrorCode.INTERNAL,
    503: ErrorCode.UNAVAILABLE,
}


class ApiError(Exception):
    """Raise from a route to answer `status` with `{"code", "message"}`."""

    def __init__(self, status: int, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = int(code if code is not None else _STATUS_CODES.get(status, status * 100000))

    @classmethod
    def unprocessable(cls, message: str) -> ApiError:
        return cls(422, message)

    @classmethod
    def not_found(cls, message: str) -> ApiError:
        return cls(404, message)

    @classmethod
    def forbidden(cls, message: str) -> ApiError:
        return cls(403, message)

    @classmethod
    def unauthorized(cls, message: str) -> ApiError:
        return cls(401, message)


def error_response(status: int, message: str, code: int | None = None) -> ORJSONResponse:
    err = ApiError(status, message, code)
    return ORJSONResponse({"code": err.code, "message": err.message}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ValidationError, _domain_validation_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)


async def _api_error(request: Request, exc: Exception) -> ORJSONResponse:
    assert isinstance(exc, ApiError)
    return ORJSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.status)


async def _domain_validation_error(request: Request, exc: Exception) -> ORJSONResponse:
    return error_response(422, str(exc))


async def _request_validation_error(request: Request, exc: Exception) -> ORJSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "malformed JSON body: " + _describe(errors[0]), ErrorCode.MALFORMED)
    return error_response(422, "; ".join(_describe(e) for e in errors[:5]))


async def _http_exception(request: Request, exc: Exception) -> ORJSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    if exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    return error_response(exc.status_code, message)


async def _unexpected(request: Request, exc: Exception) -> ORJSONResponse:
    _log.exception("unhandled error", path=request.url.path, method=request.method)
    return error_response(500, f"internal error: {type(exc).__name__}")


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    where = ".".join(loc) if loc else "body"
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{where}: {msg}"
