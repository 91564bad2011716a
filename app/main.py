"""The HTTP API: `create_app(settings)` builds the FastAPI app (uvicorn --factory app.main:create_app).

Request path: validate (app.schemas) -> enqueue (app.queue) -> 202; a worker runs the job;
GET /jobs/{id} reads it back (app.queue.read_job) with image URLs from app.storage.
Never imports torch, `model` or `worker`.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from redis import Redis

from app import events, openai_compat
from app import queue as q
from app.errors import (ImageNotFound, JobConflict, JobNotFound, NoWorker, QueueFull,
                        SizeNotServed, install_error_handlers)
from app.metrics import ApiMetrics
from app.schemas import (ErrorBody, GenerateRequest, ImageOut, JobAccepted, JobParameters, JobView, ModelOut,
                         ModelsOut, Progress, Timings)
from app.settings import ApiSettings
from app.storage import LocalStorage

log = logging.getLogger("app")
ERRORS = {code: {"model": ErrorBody} for code in (404, 409, 422, 429, 503)}


@dataclass
class Context:
    settings: ApiSettings
    redis: Redis
    storage: LocalStorage
    metrics: ApiMetrics


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    logging.getLogger("app").setLevel(settings.log_level.upper())
    app = FastAPI(title="STAR image generation", version="0.1.0",
                  description="Text-to-image with STAR (scale-wise autoregressive). Jobs are queued "
                              "and run in batches by GPU workers; poll GET /jobs/{id}.")
    ctx = Context(settings, q.connect(settings.redis_url),
                  LocalStorage(settings.storage_dir, settings.public_base_url), ApiMetrics())
    app.state.ctx = ctx
    install_error_handlers(app)
    ctx.metrics.install(app)
    _add_job_routes(app, ctx)
    _add_image_route(app, ctx)
    _add_service_routes(app, ctx)
    app.include_router(events.create_router())         # GET /jobs/{id}/events (SSE)
    app.include_router(openai_compat.create_router())  # POST /v1/images/generations
    _add_web_page(app)
    return app


STATIC_DIR = Path(__file__).with_name("static")


def _add_web_page(app: FastAPI) -> None:
    """The browser UI (docs/clients.md): `/` is its page, `/static/...` its script and style."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def _add_job_routes(app: FastAPI, ctx: Context) -> None:
    base = ctx.settings.public_base_url.rstrip("/")

    @app.post("/generate", status_code=202, response_model=JobAccepted, responses=ERRORS, tags=["jobs"])
    def generate(body: GenerateRequest, response: Response) -> JobAccepted:
        """Queue a generation request; poll `status_url` (also the `Location` header)."""
        model, size = _choose_model(ctx, body.size)
        if q.queue_depth(ctx.redis, model) >= ctx.settings.queue_limit:
            raise QueueFull(f"the queue of model {model} is full ({ctx.settings.queue_limit} jobs); retry later",
                            headers={"Retry-After": str(ctx.settings.retry_after_s)})
        params = body.model_dump()
        params["size"] = size
        if params["seed"] is None:
            params["seed"] = secrets.randbelow(2**31)
        job, position = q.enqueue(ctx.redis, params, model, deadline_s=ctx.settings.job_deadline_s,
                                  result_ttl=ctx.settings.result_ttl_s, failure_ttl=ctx.settings.failure_ttl_s)
        status_url = f"{base}/jobs/{job.id}"
        response.headers["Location"] = status_url
        log.info("queued job %s on %s (%d x %dpx)", job.id, model, params["n"], size)
        return JobAccepted(id=job.id, status_url=status_url, queue_position=position)

    @app.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
    def get_job(job_id: str) -> JobView:
        """Status, progress, timings, parameters and (on success) image URLs of a job."""
        state = q.read_job(ctx.redis, job_id)
        if state is None:
            raise JobNotFound(f"no job with id {job_id} (unknown, or its record expired)")
        return _job_view(state, ctx.storage)

    @app.delete("/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
    def cancel_job(job_id: str, response: Response) -> JobView:
        """Cancel: a queued job at once (200, also for a job already canceled); a running one at
        its next scale boundary (202, poll until `canceled`). 409 for finished jobs."""
        outcome = q.request_cancel(ctx.redis, job_id)
        if outcome is None:
            raise JobNotFound(f"no job with id {job_id} (unknown, or its record expired)")
        if outcome not in ("canceled", "cancel_requested"):
            raise JobConflict(f"job {job_id} is already {outcome}; nothing to cancel")
        response.status_code = 202 if outcome == "cancel_requested" else 200
        return get_job(job_id)


def _add_image_route(app: FastAPI, ctx: Context) -> None:
    @app.get("/images/{image_id}.png", tags=["images"], response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}})
    def get_image(image_id: str, request: Request) -> Response:
        """A stored PNG; its text chunks carry the prompt, seed and parameters."""
        path = ctx.storage.find(image_id)
        if path is None:
            raise ImageNotFound(f"no image {image_id}")
        headers = {"Cache-Control": f"public, max-age={ctx.settings.image_max_age_s}, immutable",
                   "ETag": f'"{image_id}"'}
        if request.headers.get("if-none-match") in (headers["ETag"], "*"):
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/png", headers=headers)


def _add_service_routes(app: FastAPI, ctx: Context) -> None:
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        """The process is alive (checks nothing else)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], responses={503: {"model": ErrorBody}})
    def readyz() -> JSONResponse:
        """Redis answers and at least one worker is ready or busy."""
        ctx.redis.ping()
        ready = [e for e in q.live_workers(ctx.redis) if e.state in q.READY_STATES and e.size]
        if not ready:
            raise NoWorker("no live worker is ready (none registered, or all starting/draining)")
        return JSONResponse({"status": "ready", "workers": len(ready),
                             "models": sorted({e.model for e in ready})})

    @app.get("/models", response_model=ModelsOut, tags=["service"])
    def models() -> ModelsOut:
        """Models and sizes served by live workers; the default size is the largest."""
        return _models(ctx)

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics() -> Response:
        """Prometheus exposition of the API process (see app/metrics.py)."""
        return Response(ctx.metrics.scrape(ctx.redis), media_type=CONTENT_TYPE_LATEST)


def _choose_model(ctx: Context, size: int | None) -> tuple[str, int]:
    entries = q.live_workers(ctx.redis)
    sizes = q.served_sizes(entries)
    if not sizes:
        raise NoWorker("no live worker serves any model; start a worker (star worker) and retry")
    size = size or max(sizes)
    model = q.model_for_size(entries, size)
    if model is None:
        served = ", ".join(map(str, sizes))
        raise SizeNotServed(f"size {size} is not served; served sizes: {served}", field="size")
    return model, size


def _models(ctx: Context) -> ModelsOut:
    groups: dict[tuple[str, int], list[q.WorkerEntry]] = {}
    for entry in q.live_workers(ctx.redis):
        if entry.size:
            groups.setdefault((entry.model, entry.size), []).append(entry)
    out = []
    for (model, size), entries in sorted(groups.items()):
        states: dict[str, int] = {}
        for e in entries:
            states[e.state] = states.get(e.state, 0) + 1
        out.append(ModelOut(name=model, size=size, queue=q.queue_name(model), workers=len(entries),
                            queue_depth=q.queue_depth(ctx.redis, model), states=states,
                            max_batch=max(e.max_batch for e in entries)))
    sizes = q.served_sizes(e for es in groups.values() for e in es)
    return ModelsOut(models=out, sizes=sizes, default_size=max(sizes) if sizes else None)


def _job_view(state: q.JobState, storage: LocalStorage) -> JobView:
    def seconds(a, b):
        return round((b - a).total_seconds(), 3) if a and b else None

    images = None
    if state.images is not None:
        images = [ImageOut(url=storage.url(i["id"]), seed=i["seed"], width=i["width"], height=i["height"])
                  for i in state.images]
    return JobView(
        id=state.id, status=state.status, model=state.model, queue_position=state.queue_position,
        progress=Progress(**state.progress) if state.progress else None,
        cancel_requested=state.cancel_requested and state.status in ("queued", "running"),
        timings=Timings(queued_at=state.queued_at, started_at=state.started_at, finished_at=state.finished_at,
                        queue_wait_s=seconds(state.queued_at, state.started_at), model_s=state.model_s,
                        total_s=seconds(state.queued_at, state.finished_at)),
        request=JobParameters(**state.params), images=images, prompt_truncated=state.prompt_truncated,
        error=state.error,
    )
