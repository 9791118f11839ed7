"""Errors a request can end with: a status and a stable code per kind.

Each door renders them its own way (the V2 doors as ``{"error": "<message>"}``, as the Open
Inference Protocol says); ``error_body`` and ``error_response`` are the gateway's own shape,
``{"error": {"code": "<stable_code>", "message": "<what and where>"}}``, for every other route.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

from gateway.responses import json_response

__all__ = [
    "BodyTooLarge",
    "DeadlineExceeded",
    "Forbidden",
    "GatewayError",
    "HttpError",
    "InvalidInput",
    "MalformedJson",
    "MethodNotAllowed",
    "ModelFailed",
    "NotFound",
    "Overloaded",
    "TooManyRows",
    "Unauthorized",
    "Unavailable",
    "error_body",
    "error_response",
]


class GatewayError(Exception):
    """Base: a request that ends with ``status`` and a stable ``code``."""

    status = 500
    code = "internal_error"
    headers: dict[str, str] = {}  # noqa: RUF012 - read-only class default

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class HttpError(GatewayError):
    """A routing error of the web framework (unknown path, wrong method, bad path parameter),
    with its status and headers."""

    _CODES = {404: "not_found", 405: "method_not_allowed",  # noqa: RUF012 - read-only
              408: "request_timeout"}

    def __init__(self, status: int, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, code=self._CODES.get(status, "http_error"))
        self.status = status
        self.headers = dict(headers or {})


class InvalidInput(GatewayError):
    status = 422
    code = "invalid_input"


class MalformedJson(GatewayError):
    status = 400
    code = "malformed_json"


class BodyTooLarge(GatewayError):
    status = 413
    code = "body_too_large"


class TooManyRows(GatewayError):
    """More rows than any retry could get answered (e.g. past the model's queue limit)."""

    status = 413
    code = "too_many_rows"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"


class Overloaded(GatewayError):
    """Queue full: refused at once; the client may retry after ``Retry-After`` seconds."""

    status = 503
    code = "overloaded"
    headers = {"Retry-After": "1"}  # noqa: RUF012


class Unavailable(GatewayError):
    status = 503
    code = "unavailable"
    headers = {"Retry-After": "1"}  # noqa: RUF012


class DeadlineExceeded(GatewayError):
    status = 504
    code = "deadline_exceeded"


class ModelFailed(GatewayError):
    """The model raised for this input; the message names the error type only."""

    status = 500
    code = "model_error"


def error_body(exc: GatewayError) -> dict[str, dict[str, str]]:
    return {"error": {"code": exc.code, "message": exc.message}}


def error_response(exc: GatewayError) -> Response:
    return json_response(error_body(exc), exc.status, exc.headers)
