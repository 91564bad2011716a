"""Domain errors, the one table mapping them to HTTP status codes, and the handlers that give every
error body the same shape: `{"error": {"code": ..., "message": ..., "field": ...}}`.

Every 429 and 503 carries `Retry-After`; a 405 carries `Allow` with every method of its path; a
body that is not a JSON object is told why (app.body), a bad `size` is told the sizes served now.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.body import EXAMPLE_BODY, describe_json_error, describe_unreadable_body
from app.jobs.workers import served_sizes
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


class PriorityNotAllowed(Forbidden):
    code = "priority_not_allowed"


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


WHOLE_BODY_ERRORS = ("missing", "model_attributes_type", "model_type", "dict_type", "json_invalid")


def validation_message(error: Mapping[str, Any], served_sizes: list[int] | None = None) -> tuple[str | None, str]:
    """(field, message) for one pydantic error, naming the field and its allowed range (for `size`,
    the sizes served now when known)."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(loc) or None
    kind = error.get("type", "")
    if field is None and kind in WHOLE_BODY_ERRORS:
        return None, describe_unreadable_body("application/json", error.get("input"))
    if kind == "extra_forbidden":
        return field, f"unknown field `{field}`; allowed fields: {', '.join(GenerateRequest.model_fields)}"
    if kind == "missing":
        return field, f"`{field}` is required" + _range_suffix(field, served_sizes)
    reason = error.get("msg", "is invalid")
    if field == "size" and isinstance(error.get("input"), str):
        reason = f"must be a JSON integer such as 128, not the string {error['input'][:20]!r}" + (
            " (the \"WxH\" form is for POST /v1/images/generations)" if "x" in error["input"] else "")
    return field, f"`{field}`: {reason}" + _range_suffix(field, served_sizes)


def _range_suffix(field: str | None, served_sizes: list[int] | None) -> str:
    if field == "size" and served_sizes:
        return f"; allowed: a size served now, as an integer: {', '.join(map(str, served_sizes))} (GET /models)"
    allowed = allowed_range(field) if field else None
    return f"; allowed: {allowed}" if allowed else ""


def body_error_message(exc: RequestValidationError, content_type: str | None) -> str | None:
    """The message for a body that is not a JSON object (unreadable, empty, wrong header), else None."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        return describe_json_error(exc.body, pos, (first.get("ctx") or {}).get("error", "invalid JSON"))
    if loc == ("body",) and first.get("type") in WHOLE_BODY_ERRORS:
        return describe_unreadable_body(content_type, exc.body, empty=first.get("type") == "missing")
    return None


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers on this request's path (a 405's Allow header)."""
    methods: set[str] = set()
    scope = {"type": "http", "path": request.url.path, "root_path": "", "method": request.method}   # a mount's changes undone
    for route in request.app.router.routes:
        if route.matches(scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ("GET", "HEAD"))   # a Mount: static files
    return sorted(methods)


def _with_retry_after(request: Request, status: int, headers: Mapping[str, str] | None) -> dict[str, str]:
    """headers, plus `Retry-After` (STAR_RETRY_AFTER_S) on a 429 or 503 that has none."""
    out = dict(headers or {})
    if status in (429, 503) and not any(name.lower() == "retry-after" for name in out):
        ctx = getattr(request.app.state, "ctx", None)
        out["Retry-After"] = str(ctx.settings.retry_after_s if ctx is not None else REDIS_RETRY_AFTER_S)
    return out


async def _served_sizes(request: Request) -> list[int] | None:
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None:
        return None
    try:
        return served_sizes(await run_in_threadpool(ctx.workers.get, None))
    except redis.RedisError:
        return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        status = status_for(exc)
        return error_response(status, exc.code, exc.message, exc.field, _with_retry_after(request, status, exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        body_problem = body_error_message(exc, request.headers.get("content-type"))
        if body_problem is not None:
            return error_response(422, InvalidRequest.code, body_problem)
        sizes = await _served_sizes(request) if any("size" in e.get("loc", ()) for e in exc.errors()) else None
        problems = [validation_message(error, sizes) for error in exc.errors()] or [(None, "invalid request")]
        field = problems[0][0]   # the first field at fault; the message covers all of them
        return error_response(422, InvalidRequest.code, " | ".join(m for _, m in problems), field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:   # FastAPI could not parse the body: not UTF-8 (JSON errors are 422 above)
            return error_response(422, InvalidRequest.code, "the body could not be read as text: send a JSON "
                                  f"object in UTF-8 with Content-Type: application/json, e.g. {EXAMPLE_BODY}")
        headers = dict(getattr(exc, "headers", None) or {})
        message = str(exc.detail)
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, message, None,
                              _with_retry_after(request, exc.status_code, headers))

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
