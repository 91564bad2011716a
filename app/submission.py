"""POST /generate's way into the queue: Idempotency-Key, per-key job slot, model choice (by size, and
a sampler head for sampler "head", from the worker registry), admit and enqueue (app.jobs), with
the protocol's refusals turned into the API's errors (app.errors)."""
from __future__ import annotations

import logging
import secrets
import uuid

from app import auth
from app.context import Context
from app.errors import (IdempotencyConflict, InvalidRequest, JobConflict, NoWorker, PriorityNotAllowed, QueueFull,
                        SamplerNotAvailable, SizeNotServed,
                        TooManyJobs)
from app.jobs import admission, submit as protocol
from app.jobs.workers import WorkerEntry, model_for_size, served_sizes
from app.schemas import GenerateRequest
from app.settings import allowed_high_priority

log = logging.getLogger("app")


def submit(ctx: Context, body: GenerateRequest, idempotency_key: str | None) -> tuple[str, int | None]:
    """(job id, queue position); the position is None for the job of an earlier request with the
    same Idempotency-Key."""
    name, job_id = auth.current_key.get(), str(uuid.uuid4())
    check_priority(ctx, body, name)
    if idempotency_key is not None:
        earlier = _claim_idempotency(ctx, name, idempotency_key, body, job_id)
        if earlier is not None:
            return earlier, None
    try:
        return job_id, _enqueue_new(ctx, body, job_id, name)
    except BaseException:
        if idempotency_key is not None:
            admission.forget_idempotency(ctx.redis, name, idempotency_key, job_id)
        raise


def check_priority(ctx: Context, body: GenerateRequest, name: str) -> None:
    """PriorityNotAllowed (403) when this API key may not queue `high` jobs."""
    if body.priority == "high" and not allowed_high_priority(ctx.settings.high_priority_keys, name):
        raise PriorityNotAllowed("this API key may not use priority `high` (the operator lists the keys that may "
                                 "in STAR_HIGH_PRIORITY_KEYS); send `normal` or `low`", field="priority")


def _claim_idempotency(ctx: Context, name: str, key: str, body: GenerateRequest, job_id: str) -> str | None:
    """None for a new Idempotency-Key (now bound to job_id), else the job of the earlier request."""
    try:
        return admission.claim_idempotency(ctx.redis, name, key, admission.fingerprint(body.model_dump(mode="json")),
                                           job_id, ctx.settings.result_ttl_s)
    except admission.IdempotencyMismatch:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request body; "
                                  "use a new key for a new request", field="Idempotency-Key") from None
    except admission.StillAccepting:
        raise JobConflict("a request with this Idempotency-Key is still being accepted; retry shortly",
                          field="Idempotency-Key") from None


def _enqueue_new(ctx: Context, body: GenerateRequest, job_id: str, name: str) -> int:
    """Admit and enqueue a new job (per-key slot, then the queue limit); its queue position."""
    settings = ctx.settings
    model, size, scales = choose_model(ctx, body.size, body.sampler)
    check_guidance_stop(model, scales, body.guidance_stop_scale)
    params = body.model_dump(exclude={"webhook_url", "webhook_events", "priority"})   # what the model runs with
    webhook = {"url": body.webhook_url, "events": body.webhook_events or ["final"]} if body.webhook_url else None
    params["size"] = size
    if params["seed"] is None:
        params["seed"] = secrets.randbelow(2**31)
    limit = settings.max_concurrent_jobs_per_key if ctx.keys.enabled else 0
    hold_s = int(settings.job_deadline_s) + settings.result_ttl_s
    if limit and not admission.reserve_slot(ctx.redis, name, job_id, limit, hold_s):
        raise TooManyJobs(f"this API key already has {limit} jobs queued or running "
                          "(STAR_MAX_CONCURRENT_JOBS_PER_KEY); retry when one ends",
                          headers={"Retry-After": str(settings.retry_after_s)})
    try:
        accepted = protocol.enqueue(ctx.redis, params, model, deadline_s=settings.job_deadline_s,
                             result_ttl=settings.result_ttl_s, failure_ttl=settings.failure_ttl_s,
                             queue_limit=settings.queue_limit, job_id=job_id,
                             api_key=name if ctx.keys.enabled else None, webhook=webhook,
                             priority=body.priority)
    except BaseException:
        admission.release_slot(ctx.redis, name, job_id)
        raise
    if accepted is None:
        admission.release_slot(ctx.redis, name, job_id)
        raise QueueFull(f"the queue of model {model} is full ({settings.queue_limit} jobs, all lanes); retry later",
                        headers={"Retry-After": str(settings.retry_after_s)})
    log.info("queued job %s on %s, lane %s (%d x %dpx)", job_id, model, body.priority, params["n"], size)
    return accepted[1]


def check_guidance_stop(model: str, scales: int | None, stop: int | None) -> None:
    """guidance_stop_scale must be a scale index of the model (0 .. its number of scales; not
    checked here while no worker has reported the number: the worker checks it then)."""
    if stop is not None and scales is not None and stop > scales:
        raise InvalidRequest(f"guidance_stop_scale must be from 0 to {scales}: model {model} has {scales} scales "
                             f"(0 = no guidance at all, {scales} = guidance on every scale), got {stop}",
                             field="guidance_stop_scale")


def choose_model(ctx: Context, size: int | None, sampler: str = "auto") -> tuple[str, int, int | None]:
    """(model, size, the model's number of scales: None while no worker of it has loaded it) for a
    request: the size asked, else the largest served (with sampler "head", the largest served by a
    model with a sampler head); 422 when no model serves it as asked."""
    entries = ctx.workers.get(size)
    sizes = served_sizes(entries)
    if not sizes:
        raise NoWorker("no live worker serves any model; start a worker (star worker) and retry")
    head = sampler == "head"
    size = size or max(served_sizes(entries, sampler_head=head) or sizes)
    model = model_for_size(entries, size, sampler_head=head)
    if model is not None:
        return model, size, min((e.scales for e in entries if e.model == model and e.scales), default=None)
    if head and size in sizes:
        raise SamplerNotAvailable(_no_head_message(entries, size), field="sampler")
    served = ", ".join(map(str, sizes))
    raise SizeNotServed(f"size {size} is not served; served sizes: {served}", field="size")


def _no_head_message(entries: list[WorkerEntry], size: int) -> str:
    model = model_for_size(entries, size)
    with_head = served_sizes(entries, sampler_head=True)
    where = (f"sizes served by a model with one: {', '.join(map(str, with_head))}" if with_head
             else "no served model has one")
    return (f"sampler 'head' needs a model with a sampler head; {model} (size {size}) has none ({where}; "
            "GET /models shows `sampler_head`). Use sampler 'auto' or 'plain', or another size")
