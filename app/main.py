"""The HTTP API: `create_app(settings)` builds the FastAPI app (uvicorn --factory app.main:create_app).

Request path: body size (app.guards) -> API key (app.auth) and rate limit (app.guards) -> validate
(app.schemas) -> Idempotency-Key and per-key job slot (app.jobs.admission) -> admit and enqueue
(app.jobs.submit) -> 202; a worker runs the job; GET /jobs/{id} reads it back (app.jobs.read) with
image URLs from app.storage (signed by app.signing when configured), at once or, with `?wait=S`,
when the job ends (app.longpoll). Background tasks of the process: the reaper, the job-notice
subscription (app.jobs.notify) and the webhook deliverer (app.webhook_delivery). Never imports
torch, `model` or `worker`.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool

from app import accounting, auth, events, openai_compat
from app.body import JsonRoute
from app.context import Context, WorkerCache
from app.errors import Forbidden, ImageNotFound, JobConflict, NoWorker, install_error_handlers
from app.guards import BodySizeLimit, check_prompt_length, require_key
from app.jobs import notify, reaper, read
from app.jobs.lanes import lane_queue_name
from app.jobs.rq_adapter import connect, queue_name
from app.jobs.workers import READY_STATES, WorkerEntry, live_workers, served_sizes
from app.metrics import ApiMetrics
from app.ownership import cancel_own_job, read_own_job
from app.schemas import ErrorBody, GenerateRequest, JobAccepted, JobView, LaneOut, ModelOut, ModelsOut
from app.settings import ApiSettings
from app.signing import SignedStorage, UrlSigner
from app.storage import Storage
from app.stores import open_storage
from app.storage_s3 import S3Storage
from app.submission import submit
from app.views import job_view
from app.webhook_delivery import Deliverer, document_webhooks
from app.webhook_targets import check_webhook

log = logging.getLogger("app")
AUTH = [Depends(require_key)]
Caller = Annotated[str, Depends(require_key)]   # the API key's name (the dependency runs once per request)
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
                              "and run in batches by GPU workers; GET /jobs/{id}?wait=60 answers when "
                              "the job ends, or give a `webhook_url` to be called.",
                  lifespan=partial(_lifespan, ctx))
    app.state.ctx = ctx
    app.router.route_class = JsonRoute   # bodies parsed by app.body (clear errors for unreadable ones)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    ctx.metrics.install(app)   # outermost: refused requests are counted too
    _add_job_routes(app, ctx)
    _add_image_route(app, ctx)
    _add_service_routes(app, ctx)
    app.include_router(events.create_router(settings), dependencies=AUTH, responses=errors(401, 429, 503))
    app.include_router(accounting.create_router(), responses=errors(401, 403, 422, 429, 503))
    app.include_router(openai_compat.create_router(settings), dependencies=AUTH,
                       responses={**errors(401, 413, 429, 503), **OPENAI_ERRORS})
    _add_web_page(app)
    document_webhooks(app)
    return app


@asynccontextmanager
async def _lifespan(ctx: Context, app: FastAPI):
    """While serving: the reaper every STAR_REAPER_S (workers run it too; a Redis lock lets one
    process act per period), so the jobs of dead workers are re-queued even when no worker of
    their model is left to do it; the job-notice subscription (wakes long-polls and the
    deliverer); the webhook deliverer when webhooks are on (STAR_WEBHOOK_SECRET) and this process
    delivers (STAR_WEBHOOK_CONCURRENCY > 0)."""
    settings = ctx.settings
    deliverer = Deliverer(ctx) if settings.webhook_secret and settings.webhook_concurrency > 0 else None
    jobs = [notify.listen(settings.redis_url, ctx.ends.ended, deliverer.wake.set if deliverer else lambda: None)]
    if deliverer is not None:
        jobs.append(deliverer.run())
    if settings.reaper_s > 0:
        jobs.append(_reap_forever(ctx))
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            await _stop(task)


async def _stop(task: asyncio.Task) -> None:
    """Cancel a background task and wait for its end. Cancel again while it runs: a cancel that
    lands as a library's internal timeout fires can be taken for that timeout and swallowed
    (seen with redis-py's pub/sub reads), and the task would run on."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s had stopped with an error", task.get_coro(), exc_info=task.exception())


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
            if outcome.action == "expired":   # waited in its queue past its deadline (logged by the reaper)
                continue
            log.warning("reaper: job %s of the lost worker %s: %s", outcome.job_id, outcome.worker or "?",
                        outcome.action)


# POST /v1/images/generations answers in OpenAI's error shape (app.openai_compat).
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {code: {"description": "An error in OpenAI's shape", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "object"}}}}}}
    for code in (400, 403, 404, 409, 500, 504)}


def _context(settings: ApiSettings) -> Context:
    keys = auth.ApiKeys.load(_secret(settings.api_keys), settings.api_keys_file, _secret(settings.admin_api_keys))
    if keys.enabled:
        log.info("API keys: %d configured (%d admin); requests without a valid key get 401; a job is "
                 "visible to its own key only", len(keys.hashes), len(keys.admins))
    else:
        log.warning("no API keys configured (STAR_API_KEYS, STAR_API_KEYS_FILE): authentication is off")
    storage: Storage | SignedStorage = _open_storage(settings)
    signer = None
    if settings.url_signing_key:   # settings refuse it with presigned S3 URLs: they would sign nothing
        signer = UrlSigner(settings.url_signing_key.get_secret_value(), settings.url_ttl_s)
        storage = SignedStorage(storage, signer)
    conn = connect(settings.redis_url, retries=2)
    metrics = ApiMetrics(usage_label=keys.usage_label)
    return Context(settings, conn, storage, metrics, keys, WorkerCache(conn, settings.worker_cache_s), signer)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def _open_storage(settings: ApiSettings) -> Storage:
    """The image store; for S3, how clients reach images (STAR_S3_URLS, app/storage_s3.py)."""
    if not settings.storage_url:
        return open_storage(settings)
    storage = open_storage(settings, urls=settings.image_urls, url_ttl_s=settings.url_ttl_s,
                           redirect_ttl_s=settings.s3_redirect_ttl_s,
                           public_endpoint_url=settings.s3_public_endpoint_url)
    if isinstance(storage, S3Storage):
        log.info("images in %s; clients get %s URLs", storage.describe(), settings.image_urls)
    return storage


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
              responses=errors(401, 403, 409, 413, 422, 429, 503))
    def generate(body: GenerateRequest, response: Response,
                 idempotency_key: Annotated[str | None, Header(
                     alias="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS,
                     description="Makes retries safe: a POST repeated with the same key and body returns "
                                 "the first one's job; another body with the same key is 409.")] = None,
                 ) -> JobAccepted:
        """Queue a generation request; poll `status_url` (also the `Location` header)."""
        check_prompt_length(body, ctx.settings.max_prompt_chars)
        check_webhook(body, ctx.settings)
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

    def read_view(job_id: str, caller: str) -> JobView:
        return job_view(read_own_job(ctx, caller, job_id), ctx.storage)

    @app.get("/jobs/{job_id}", response_model=JobView, responses=errors(401, 404, 422, 429, 503), tags=["jobs"],
             dependencies=AUTH)
    async def get_job(job_id: str, caller: Caller, wait: float | None = Query(
            None, ge=0, le=ctx.settings.long_poll_max_s,
            description="Long-poll: answer as soon as the job ends, or after this many seconds (at most "
                        "STAR_LONG_POLL_MAX_S), whichever comes first. Absent or 0: answer at once.")) -> JobView:
        """Status, progress, timings, parameters and (on success) image URLs of a job; with
        `wait`, once the job has ended or `wait` seconds have passed. With API keys on, only the key
        that created the job (or an admin key) sees it; others get 404."""
        if not wait:
            return await run_in_threadpool(read_view, job_id, caller)
        return await ctx.ends.wait(job_id, wait, partial(run_in_threadpool, read_view, job_id, caller),
                                   attrgetter("status"))

    @app.delete("/jobs/{job_id}", response_model=JobView, tags=["jobs"], dependencies=AUTH, responses={
                202: {"model": JobView, "description": "The job is running: it stops at its next scale boundary "
                      "(`cancel_requested` is true; poll until `canceled`)"},
                **errors(401, 404, 409, 413, 429, 503)})
    def cancel_job(job_id: str, response: Response, caller: Caller) -> JobView:
        """Cancel: a queued job at once (200, also for a job already canceled); a running one at
        its next scale boundary (202, poll until `canceled`). 409 for finished jobs; 404 for
        another key's job."""
        outcome = cancel_own_job(ctx, caller, job_id)
        if outcome not in ("canceled", "cancel_requested"):
            raise JobConflict(f"job {job_id} is already {outcome}; nothing to cancel")
        response.status_code = 202 if outcome == "cancel_requested" else 200
        return read_view(job_id, caller)


def _add_image_route(app: FastAPI, ctx: Context) -> None:
    @app.get("/images/{image_id}.png", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 304: {"description": "Not modified"},
                        307: {"description": "S3 storage: a short-lived presigned URL of the store"},
                        **errors(403, 404)})
    def get_image(image_id: str, request: Request, expires: str | None = None, sig: str | None = None) -> Response:
        """A stored PNG; its text chunks carry the prompt, seed and parameters. With URL signing on
        (STAR_URL_SIGNING_KEY), `expires` and `sig` must be those of the URL GET /jobs/{id} gave.
        With S3 storage (STAR_STORAGE_URL), a 307 redirect to a presigned URL of the store."""
        max_age = ctx.settings.image_max_age_s
        if ctx.signer is not None:
            problem = ctx.signer.check(image_id, expires, sig)
            if problem:
                raise Forbidden(problem)
            max_age = min(max_age, ctx.signer.seconds_left(expires or "0"))   # checked above
        store = ctx.storage.storage if isinstance(ctx.storage, SignedStorage) else ctx.storage
        if isinstance(store, S3Storage):
            target = store.redirect_url(image_id)
            if target is None:
                raise ImageNotFound(f"no image {image_id}")
            return RedirectResponse(target, status_code=307, headers={"Cache-Control": "no-store"})
        png = store.get(image_id)   # never through a link (app.storage)
        if png is None:
            raise ImageNotFound(f"no image {image_id}")
        headers = {"Cache-Control": f"public, max-age={max_age}, immutable", "ETag": f'"{image_id}"'}
        if request.headers.get("if-none-match") in (headers["ETag"], "*"):
            return Response(status_code=304, headers=headers)
        return Response(png, media_type="image/png", headers=headers)


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
        model's sampling defaults (what a request that leaves those fields out runs with), whether it
        has a sampler head (what sampler `head` needs and `auto` uses) and its queue depth and wait
        per lane."""
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
        examples = next((e.example_prompts for e in entries if e.example_prompts), [])
        head = next((e.sampler_head for e in entries if e.sampler_head is not None), None)
        loaded = next((e for e in entries if e.scales), None)
        lanes = {lane: LaneOut(queue=lane_queue_name(model, lane), queue_depth=stats.depth,
                               oldest_wait_s=stats.oldest_wait_s)
                 for lane, stats in read.lane_stats(ctx.redis, model).items()}
        out.append(ModelOut(name=model, size=size, queue=queue_name(model), workers=len(entries),
                            queue_depth=sum(lane.queue_depth for lane in lanes.values()), lanes=lanes,
                            states=states, max_batch=max(e.max_batch for e in entries), sampling=sampling,
                            example_prompts=examples, sampler_head=head,
                            scales=loaded.scales if loaded else None,
                            guidance_stop_scale=loaded.guidance_stop_scale if loaded else None))
    sizes = served_sizes(e for es in groups.values() for e in es)
    return ModelsOut(models=out, sizes=sizes, default_size=max(sizes) if sizes else None)
