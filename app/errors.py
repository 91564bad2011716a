"""Domain errors, the one table mapping them to HTTP status codes, and the handlers that give every
error body the same shape: `{"error": {"code": ..., "message": ..., "field": ...}}`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import GenerateRequest, allowed_range

log = logging.getLogger(__name__)
REDIS_RETRY_AFTER_S = 2


class ApiError(Exception):
    """A domain error; its class decides the HTTP status through STATUS_BY_ERROR."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}


class InvalidRequest(ApiError):
    code = "invalid_request"


class SizeNotServed(InvalidRequest):
    code = "size_not_served"


class SamplerNotAvailable(InvalidRequest):
    code = "sampler_not_available"


class JobNotFound(ApiError):
    code = "not_found"


class ImageNotFound(JobNotFound):
    pass


class JobConflict(ApiError):
    code = "conflict"


class IdempotencyConflict(JobConflict):
    code = "idempotency_conflict"


class QueueFull(ApiError):
    code = "queue_full"


class RateLimited(QueueFull):
    code = "rate_limited"


class TooManyJobs(QueueFull):
    code = "too_many_jobs"


class Unauthorized(ApiError):
    code = "unauthorized"


class Forbidden(ApiError):
    code = "forbidden"


class PayloadTooLarge(ApiError):
    code = "payload_too_large"


class NoWorker(ApiError):
    code = "no_worker"


class RedisUnavailable(ApiError):
    code = "redis_unavailable"


STATUS_BY_ERROR: dict[type[ApiError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    PayloadTooLarge: 413,
    InvalidRequest: 422,
    JobNotFound: 404,
    JobConflict: 409,
    QueueFull: 429,
    NoWorker: 503,
    RedisUnavailable: 503,
}


def status_for(error: ApiError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(error: Mapping[str, Any]) -> tuple[str | None, str]:
    """(field, message) for one pydantic error, naming the field and its allowed range."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(loc) or None
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return field, f"unknown field `{field}`; allowed fields: {', '.join(GenerateRequest.model_fields)}"
    if kind == "missing":
        return field, f"`{field}` is required" + _range_suffix(field)
    if kind in ("json_invalid", "model_attributes_type", "dict_type"):
        return None, "the body must be a JSON object, e.g. {\"prompt\": \"a red fox\"}"
    reason = error.get("msg", "is invalid")
    return field, f"`{field}`: {reason}" + _range_suffix(field)


def _range_suffix(field: str | None) -> str:
    allowed = allowed_range(field) if field else None
    return f"; allowed: {allowed}" if allowed else ""


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(status_for(exc), exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [validation_message(error) for error in exc.errors()] or [(None, "invalid request")]
        field = problems[0][0]   # the first field at fault; the message covers all of them
        return error_response(422, InvalidRequest.code, " | ".join(m for _, m in problems), field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:   # FastAPI could not parse the body (e.g. not UTF-8): as invalid JSON
            return error_response(422, InvalidRequest.code, "the body must be a JSON object in UTF-8, "
                                  "e.g. {\"prompt\": \"a red fox\"}")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        connection = isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
        log.warning("redis unavailable: %s", exc, exc_info=None if connection else exc)   # details stay here
        return error_response(503, RedisUnavailable.code, "the job store (Redis) is unavailable; retry later",
                              headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal error (logged on the server)")
