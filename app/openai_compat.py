"""`POST /v1/images/generations`: OpenAI's image API in front of the STAR queue, so the official
`openai` SDK (and tools built on it) work with only `base_url` changed.

The request is translated to a `GenerateRequest` and queued by the POST /generate endpoint itself
(same model choice, queue limit, seed choice and logging); the call then waits for the job (at
most STAR_OPENAI_TIMEOUT_S, after which the job is canceled) and answers
`{"created": unix time, "data": [{"url": ...} | {"b64_json": ...}, ...]}`.

OpenAI fields: `prompt`, `n` (1-4), `size` ("WxH", square, a size a worker serves; "auto" or
absent = the largest), `response_format` ("url" or "b64_json"), `user` (accepted, unused), `model`
(a served STAR model's name picks its size when `size` is absent; any other value is ignored).
STAR's own parameters (`negative_prompt`, `seed`, `guidance_scale`, `top_k`, `top_p`,
`temperature`, `guidance_stop_scale`, `sampler`, `priority`, `webhook_url`, `webhook_events`) may be added (the SDK's
`extra_body`); any other field is ignored.
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; invalid requests are
400 as at OpenAI, `code` carries STAR's error code.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from redis import RedisError
from starlette.concurrency import run_in_threadpool

from app.body import EXAMPLE_BODY, JsonRoute, describe_json_error
from app.errors import REDIS_RETRY_AFTER_S, ApiError, RedisUnavailable, status_for, validation_message
from app.jobs.cancel import request_cancel
from app.jobs.read import JobState, read_job
from app.jobs.states import ACTIVE
from app.jobs.workers import WorkerEntry, live_workers, served_sizes
from app.schemas import GenerateRequest
from app.settings import ApiSettings

log = logging.getLogger(__name__)
SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$")
STAR_FIELDS = ("negative_prompt", "seed", "guidance_scale", "top_k", "top_p", "temperature", "guidance_stop_scale",
               "sampler", "priority", "webhook_url", "webhook_events")
NO_RETRY = {"x-should-retry": "false"}   # the SDK would otherwise resend (and queue again)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        kind = ("rate_limit_error" if self.status == 429 else "server_error" if self.status >= 500
                else "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    @classmethod
    def from_api_error(cls, exc: ApiError, retry_after_s: int) -> "OpenAIError":
        status = status_for(exc)
        headers = exc.headers if status not in (429, 503) else {"Retry-After": str(retry_after_s), **exc.headers}
        return cls(400 if status == 422 else status, exc.message, param=exc.field, code=exc.code, headers=headers)


def translate(body: object, served: list[WorkerEntry]) -> tuple[GenerateRequest, str]:
    """(the STAR request, response_format) for an OpenAI request body; OpenAIError if invalid."""
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the body must be a JSON object, e.g. {EXAMPLE_BODY}")
    response_format = body.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise OpenAIError(400, f"response_format must be 'url' or 'b64_json', not {response_format!r}",
                          param="response_format", code="invalid_value")
    fields = {name: body[name] for name in ("prompt", "n", *STAR_FIELDS) if body.get(name) is not None}
    fields["size"] = _size(body.get("size"), body.get("model"), served)
    try:
        return GenerateRequest(**fields), response_format
    except ValidationError as exc:
        param, message = validation_message(exc.errors()[0])
        raise OpenAIError(400, message, param=param, code="invalid_value") from None


def _size(size: object, model: object, served: list[WorkerEntry]) -> int | None:
    if size in (None, "", "auto"):
        return next((e.size for e in served if e.model == model and e.size), None)
    match = SIZE_RE.match(size) if isinstance(size, str) else None
    sizes = ", ".join(f"{s}x{s}" for s in served_sizes(served)) or "none (no worker is running)"
    if match is None or match.group(1) != match.group(2):
        raise OpenAIError(400, f"size must be a square 'WxH' with W == H; served sizes: {sizes}",
                          param="size", code="invalid_value")
    return int(match.group(1))


def answer(state: JobState, response_format: str, storage) -> dict:
    data = []
    for image in state.images or ():
        if response_format == "b64_json":
            png = storage.get(image["id"])
            if png is None:
                raise OpenAIError(500, f"image {image['id']} of job {state.id} is missing from storage",
                                  code="storage_error")
            item = {"b64_json": base64.b64encode(png).decode("ascii")}
        else:
            item = {"url": storage.url(image["id"])}
        data.append({**item, "seed": image["seed"]})   # seed: a STAR extension, to reproduce an image
    return {"created": int(time.time()), "data": data, "size": f"{state.params['size']}x{state.params['size']}",
            "output_format": "png", "sampler": state.params.get("sampler")}   # sampler: STAR's, as it ran


def failure(state: JobState) -> OpenAIError:
    error = state.error or {}
    message = f"job {state.id} {state.status}" + (f": {error['message']}" if error.get("message") else "")
    if state.status == "expired":
        return OpenAIError(503, message, code="expired", headers={"Retry-After": "5"})
    if state.status == "canceled":
        return OpenAIError(409, message, code="canceled", headers=NO_RETRY)
    return OpenAIError(500, message, code=error.get("code", "job_failed"), headers=NO_RETRY)


def _generate_endpoint(app):
    """The POST /generate endpoint: submitting through it keeps one queueing path."""
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == "/generate" and "POST" in (route.methods or ()):
            return route.endpoint
    raise RuntimeError("the app has no POST /generate route")


async def wait_for_job(ctx, job_id: str, settings: ApiSettings) -> JobState:
    """The job once finished; OpenAIError 504 (job canceled) after settings.openai_timeout_s."""
    deadline = time.monotonic() + settings.openai_timeout_s
    while True:
        state = await run_in_threadpool(read_job, ctx.redis, job_id)
        if state is None:
            raise OpenAIError(500, f"job {job_id} vanished while waiting", code="job_failed")
        if state.status not in ACTIVE:
            return state
        if time.monotonic() >= deadline:
            await run_in_threadpool(request_cancel, ctx.redis, job_id)
            raise OpenAIError(504, f"job {job_id} did not finish within {settings.openai_timeout_s:g}s; it was "
                              "canceled", code="timeout", headers=NO_RETRY)
        await asyncio.sleep(settings.openai_poll_s)


async def wait_unless_disconnected(ctx, job_id: str, settings: ApiSettings, request: Request) -> JobState | None:
    """wait_for_job, but None (and the job canceled) if the client goes away first."""
    waiter = asyncio.ensure_future(wait_for_job(ctx, job_id, settings))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiter, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, watcher):
            task.cancel()
    if waiter.done() and not waiter.cancelled():
        return waiter.result()
    log.info("client gone: canceling job %s", job_id)
    await run_in_threadpool(request_cancel, ctx.redis, job_id)
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_router(settings: ApiSettings) -> APIRouter:
    router = APIRouter(tags=["openai"], route_class=JsonRoute)

    @router.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": {
                     "prompt": {"type": "string"}, "n": {"type": "integer", "minimum": 1, "maximum": 4},
                     "size": {"type": "string", "example": "256x256"},
                     "response_format": {"type": "string", "enum": ["url", "b64_json"]},
                     "model": {"type": "string"}, "user": {"type": "string"},
                     "priority": {"type": "string", "enum": ["high", "normal", "low"], "default": "normal",
                                  "description": "STAR extension: as in POST /generate (its lane; `high` only for "
                                                 "the keys in STAR_HIGH_PRIORITY_KEYS, else 403)"},
                     "webhook_url": {"type": "string", "maxLength": 2048, "description": "STAR extension: as in "
                                     "POST /generate (a signed event when the job ends)"},
                     "webhook_events": {"type": "array", "items": {"type": "string", "enum": ["running", "final"]},
                                        "description": "STAR extension: as in POST /generate"}}}}}}})
    async def create_image(request: Request) -> JSONResponse:
        """OpenAI-compatible image generation: queues a job, waits for it, answers in OpenAI's shape."""
        ctx = request.app.state.ctx
        try:
            try:
                body = await request.json()
            except json.JSONDecodeError as exc:
                raise OpenAIError(400, describe_json_error(exc.doc, exc.pos, exc.msg)) from None
            except ValueError:
                raise OpenAIError(400, "the body is not valid JSON in UTF-8") from None
            served = await run_in_threadpool(live_workers, ctx.redis)
            star_request, response_format = translate(body, served)
            accepted = await run_in_threadpool(_generate_endpoint(request.app), body=star_request, response=Response())
            state = await wait_unless_disconnected(ctx, accepted.id, settings, request)
            if state is None:   # nobody is listening any more
                return JSONResponse({}, status_code=499)
            if state.status != "succeeded":
                raise failure(state)
            return JSONResponse(await run_in_threadpool(answer, state, response_format, ctx.storage))   # S3: requests
        except OpenAIError as exc:
            return exc.response()
        except ApiError as exc:
            return OpenAIError.from_api_error(exc, settings.retry_after_s).response()
        except RedisError as exc:
            log.warning("redis unavailable: %s", exc)
            return OpenAIError(503, f"the job store (Redis) is unavailable: {exc}", code=RedisUnavailable.code,
                               headers={"Retry-After": str(REDIS_RETRY_AFTER_S)}).response()

    return router
