"""The HTTP API: `create_app(settings)` builds the FastAPI app (uvicorn --factory app.main:create_app).

Request path: body size (app.guards) -> API key (app.auth) and rate limit (app.guards) -> validate
(app.schemas) -> Idempotency-Key and per-key job slot (app.jobs.admission) -> admit and enqueue
(app.jobs.submit) -> 202; a worker runs the job; GET /jobs/{id} reads it back (app.jobs.read) with
image URLs from app.storage (signed by app.signing when configured). Never imports torch, `model`
or `worker`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from app import auth, events, openai_compat
from app.context import Context, WorkerCache
from app.errors import Forbidden, ImageNotFound, JobConflict, JobNotFound, NoWorker, install_error_handlers
from app.guards import BodySizeLimit, check_prompt_length, require_key
from app.jobs import cancel, reaper, read
from app.jobs.rq_adapter import connect, queue_name
from app.jobs.workers import READY_STATES, WorkerEntry, live_workers, served_sizes
from app.metrics import ApiMetrics
from app.schemas import ErrorBody, GenerateRequest, JobAccepted, JobView, ModelOut, ModelsOut
from app.settings import ApiSettings
from app.signing import SignedStorage, UrlSigner
from app.storage import LocalStorage
from app.submission import submit
from app.views import job_view

log = logging.getLogger("app")
AUTH = [Depends(require_key)]
MAX_IDEMPOTENCY_KEY_CHARS = 255


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses: the common error body for each status code."""
    return {code: {"model": ErrorBody} for code in codes}


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    logging.getLogger("app").setLevel(settings.log_level.upper())
    ctx = _context(settings)
    app = FastAPI(title="STAR image generation", version="0.1.0",
                  description="Text-to-image with STAR (scale-wise autoregressive). Jobs are queued "
                              "and run in batches by GPU workers; poll GET /jobs/{id}.",
                  lifespan=partial(_lifespan, ctx))
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    ctx.metrics.install(app)   # outermost: refused requests are counted too
    _add_job_routes(app, ctx)
    _add_image_route(app, ctx)
    _add_service_routes(app, ctx)
    app.include_router(events.create_router(settings), dependencies=AUTH, responses=errors(401, 429, 503))
    app.include_router(openai_compat.create_router(settings), dependencies=AUTH,
                       responses={**errors(401, 413, 429, 503), **OPENAI_ERRORS})
    _add_web_page(app)
    return app


@asynccontextmanager
async def _lifespan(ctx: Context, app: FastAPI):
    """While serving: the reaper every STAR_REAPER_S (workers run it too; a Redis lock lets one
    process act per period), so the jobs of dead workers are re-queued even when no worker of
    their model is left to do it."""
    task = asyncio.create_task(_reap_forever(ctx)) if ctx.settings.reaper_s > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _reap_forever(ctx: Context) -> None:
    settings = ctx.settings
    while True:
        await asyncio.sleep(settings.reaper_s)
        try:
            outcomes = await run_in_threadpool(reaper.reap, ctx.redis, max_requeues=settings.max_requeues,
                                               deadline_s=settings.worker_deadline_s, lock_s=settings.reaper_s)
        except Exception as exc:   # Redis down, or a bug: the next period tries again
            log.warning("reaper pass failed: %s: %s", type(exc).__name__, exc)
            continue
        for outcome in outcomes:
            log.warning("reaper: job %s of the lost worker %s: %s", outcome.job_id, outcome.worker or "?",
                        outcome.action)


# POST /v1/images/generations answers in OpenAI's error shape (app.openai_compat).
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {code: {"description": "An error in OpenAI's shape", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "object"}}}}}}
    for code in (400, 404, 409, 500, 504)}


def _context(settings: ApiSettings) -> Context:
    keys = auth.ApiKeys.load(settings.api_keys.get_secret_value() if settings.api_keys else None,
                             settings.api_keys_file)
    if keys.enabled:
        log.info("API keys: %d configured; requests without a valid key get 401", len(keys.hashes))
    else:
        log.warning("no API keys configured (STAR_API_KEYS, STAR_API_KEYS_FILE): authentication is off")
    storage: LocalStorage | SignedStorage = LocalStorage(settings.storage_dir, settings.public_base_url)
    signer = None
    if settings.url_signing_key:
        signer = UrlSigner(settings.url_signing_key.get_secret_value(), settings.url_ttl_s)
        storage = SignedStorage(storage, signer)
    conn = connect(settings.redis_url, retries=2)
    return Context(settings, conn, storage, ApiMetrics(), keys, WorkerCache(conn, settings.worker_cache_s), signer)


STATIC_DIR = Path(__file__).with_name("static")


def _add_web_page(app: FastAPI) -> None:
    """The browser UI (docs/clients.md): `/` is its page, `/static/...` its script and style."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def _add_job_routes(app: FastAPI, ctx: Context) -> None:
    base = ctx.settings.public_base_url.rstrip("/")

    @app.post("/generate", status_code=202, response_model=JobAccepted, tags=["jobs"], dependencies=AUTH,
              responses=errors(401, 409, 413, 422, 429, 503))
    def generate(body: GenerateRequest, response: Response,
                 idempotency_key: Annotated[str | None, Header(
                     alias="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS,
                     description="Makes retries safe: a POST repeated with the same key and body returns "
                                 "the first one's job; another body with the same key is 409.")] = None,
                 ) -> JobAccepted:
        """Queue a generation request; poll `status_url` (also the `Location` header)."""
        check_prompt_length(body, ctx.settings.max_prompt_chars)
        job_id, position = submit(ctx, body, idempotency_key)
        status_url = f"{base}/jobs/{job_id}"
        response.headers["Location"] = status_url
        state = None
        if position is None:   # the job of an earlier request with this Idempotency-Key
            response.headers["Idempotent-Replayed"] = "true"
            state = read.read_job(ctx.redis, job_id)
        if state is not None:
            return JobAccepted(id=job_id, status=state.status, status_url=status_url,
                               queue_position=state.queue_position)
        return JobAccepted(id=job_id, status_url=status_url, queue_position=position or 0)

    @app.get("/jobs/{job_id}", response_model=JobView, responses=errors(401, 404, 429, 503), tags=["jobs"],
             dependencies=AUTH)
    def get_job(job_id: str) -> JobView:
        """Status, progress, timings, parameters and (on success) image URLs of a job."""
        state = read.read_job(ctx.redis, job_id)
        if state is None:
            raise JobNotFound(f"no job with id {job_id} (unknown, or its record expired)")
        return job_view(state, ctx.storage)

    @app.delete("/jobs/{job_id}", response_model=JobView, responses=errors(401, 404, 409, 413, 429, 503),
                tags=["jobs"], dependencies=AUTH)
    def cancel_job(job_id: str, response: Response) -> JobView:
        """Cancel: a queued job at once (200, also for a job already canceled); a running one at
        its next scale boundary (202, poll until `canceled`). 409 for finished jobs."""
        outcome = cancel.request_cancel(ctx.redis, job_id)
        if outcome is None:
            raise JobNotFound(f"no job with id {job_id} (unknown, or its record expired)")
        if outcome not in ("canceled", "cancel_requested"):
            raise JobConflict(f"job {job_id} is already {outcome}; nothing to cancel")
        response.status_code = 202 if outcome == "cancel_requested" else 200
        return get_job(job_id)


def _add_image_route(app: FastAPI, ctx: Context) -> None:
    @app.get("/images/{image_id}.png", tags=["images"], response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}, 304: {"description": "Not modified"},
                        **errors(403, 404)})
    def get_image(image_id: str, request: Request, expires: str | None = None, sig: str | None = None) -> Response:
        """A stored PNG; its text chunks carry the prompt, seed and parameters. With URL signing on
        (STAR_URL_SIGNING_KEY), `expires` and `sig` must be those of the URL GET /jobs/{id} gave."""
        max_age = ctx.settings.image_max_age_s
        if ctx.signer is not None:
            problem = ctx.signer.check(image_id, expires, sig)
            if problem:
                raise Forbidden(problem)
            max_age = min(max_age, ctx.signer.seconds_left(expires or "0"))   # checked above
        path = ctx.storage.find(image_id)
        if path is None:
            raise ImageNotFound(f"no image {image_id}")
        headers = {"Cache-Control": f"public, max-age={max_age}, immutable", "ETag": f'"{image_id}"'}
        if request.headers.get("if-none-match") in (headers["ETag"], "*"):
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/png", headers=headers)


def _add_service_routes(app: FastAPI, ctx: Context) -> None:
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        """The process is alive (checks nothing else)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], responses=errors(503))
    def readyz() -> JSONResponse:
        """Redis answers and at least one worker is ready or busy."""
        ctx.redis.ping()
        ready = [e for e in live_workers(ctx.redis) if e.state in READY_STATES and e.size]
        if not ready:
            raise NoWorker("no live worker is ready (none registered, or all starting/draining)")
        return JSONResponse({"status": "ready", "workers": len(ready),
                             "models": sorted({e.model for e in ready})})

    @app.get("/models", response_model=ModelsOut, tags=["service"], dependencies=AUTH,
             responses=errors(401, 429, 503))
    def models() -> ModelsOut:
        """Models and sizes served by live workers (the default size is the largest), with each
        model's sampling defaults: what a request that leaves those fields out runs with."""
        return _models(ctx)

    @app.get("/metrics", tags=["service"], response_class=Response, responses=errors(503))
    def metrics() -> Response:
        """Prometheus exposition of the API process (see app/metrics.py)."""
        return Response(ctx.metrics.scrape(ctx.redis), media_type=CONTENT_TYPE_LATEST)


def _models(ctx: Context) -> ModelsOut:
    groups: dict[tuple[str, int], list[WorkerEntry]] = {}
    for entry in live_workers(ctx.redis):
        if entry.size:
            groups.setdefault((entry.model, entry.size), []).append(entry)
    out = []
    for (model, size), entries in sorted(groups.items()):
        states: dict[str, int] = {}
        for e in entries:
            states[e.state] = states.get(e.state, 0) + 1
        sampling = next((e.sampling for e in entries if e.sampling), None)
        loaded = next((e for e in entries if e.scales), None)
        out.append(ModelOut(name=model, size=size, queue=queue_name(model), workers=len(entries),
                            queue_depth=read.queue_depth(ctx.redis, model), states=states,
                            max_batch=max(e.max_batch for e in entries), sampling=sampling,
                            scales=loaded.scales if loaded else None,
                            guidance_stop_scale=loaded.guidance_stop_scale if loaded else None))
    sizes = served_sizes(e for es in groups.values() for e in es)
    return ModelsOut(models=out, sizes=sizes, default_size=max(sizes) if sizes else None)
