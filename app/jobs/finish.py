"""Finish (worker side): record a started job's outcome, once, by the attempt that owns it.

Every outcome first claims the job (token -> `done:<token>`, Lua, idempotent for the same token):
a job taken away from this worker meanwhile (re-queued after it was presumed dead) is not
recorded, and the caller drops what it made (its PNGs). The outcome is then written in one
transaction with RQ's public calls, as RQ's own worker would (status, the job record, the
result, the registries, the execution, the worker's counters), plus the bookkeeping of any
ending: the cancel flag removed, the API key's job slot left, the timings left for the API's
histograms (`star:metrics:job_timings`, drained by GET /metrics), the job's webhook event put in
the outbox (app.jobs.webhooks) and its end announced to long-polls (app.jobs.notify).

succeeded: result {"images": [{id, seed, width, height}], "prompt_truncated", "model_s", "encode_s",
           "usage": {model_s, images, pixels}}; the usage also goes to meta `usage` and to its API
           key's totals (app.jobs.usage), in the same transaction
failed:    meta error {code, message}; RQ's failure result carries the traceback, else `code: message`
canceled:  RQ's cancel (CanceledJobRegistry)
expired:   a job past its deadline, never started: failed with code `expired`, by the worker that
           pulls it (`expired`) or by the reaper while it still waits in its queue (`expire_queued`)
"""
from __future__ import annotations

import json
import time
from datetime import timedelta

from redis import Redis, WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import now
from rq.worker import BaseWorker

from app.jobs import keys, notify, usage, webhooks
from app.jobs.admission import release_slot
from app.jobs.lanes import DEFAULT_LANE
from app.jobs.rq_adapter import SERIALIZER, leave_intermediate
from app.jobs.states import is_expired


def claim_outcome(conn: Redis, job: Job, token: str) -> bool:
    """The owner's right to record the outcome; False when the job was taken away meanwhile."""
    return bool(conn.eval(keys.CLAIM, 1, job.key, token))


def succeeded(worker: BaseWorker, running, result: dict) -> bool:
    """Record success (images already stored); False if this attempt no longer owns the job."""
    job = running.job
    if not claim_outcome(worker.connection, job, running.token):
        return False
    # progress stays: the job view shows it only while running, and clearing it before the
    # status turns succeeded let a poll in between see a running job without progress
    job.meta["model_s"] = result.get("model_s")
    job.meta["usage"] = result.get("usage")
    job.ended_at = now()
    ttl = job.get_result_ttl(worker.default_result_ttl)
    with worker.connection.pipeline() as pipe:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        job.save(pipeline=pipe)
        Result.create(job, Result.Type.SUCCESSFUL, ttl, return_value=result, worker_name=worker.name,
                      pipeline=pipe, execution_id=running.execution.id,
                      execution_started_at=running.execution.created_at, execution_ended_at=job.ended_at)
        if ttl != 0:
            job.finished_job_registry.add(job, ttl, pipeline=pipe)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        _end_execution(worker, pipe, running, success=True)
        if result.get("usage"):
            usage.record(pipe, job, result["usage"])
        _ended(pipe, job, "succeeded")
        pipe.execute()
    return True


def failed(worker: BaseWorker, running, code: str, message: str, exc_string: str = "") -> bool:
    """Record a failure with its code; False if this attempt no longer owns the job."""
    job = running.job
    if not claim_outcome(worker.connection, job, running.token):
        return False
    job.meta.update(error={"code": code, "message": message}, progress=None)
    job.ended_at = now()
    with worker.connection.pipeline() as pipe:
        _fail(pipe, job, exc_string or f"JobFailed: {code}: {message}", worker.name)
        _end_execution(worker, pipe, running, success=False)
        _ended(pipe, job, "failed")
        pipe.execute()
    return True


def canceled(worker: BaseWorker, running) -> bool:
    """A running job canceled at a scale boundary; False if this attempt no longer owns the job."""
    job = running.job
    if not claim_outcome(worker.connection, job, running.token):
        return False
    job.ended_at = now()
    with worker.connection.pipeline() as pipe:
        job.cancel(pipeline=pipe)    # status canceled, CanceledJobRegistry
        job.save(pipeline=pipe)
        job.cleanup(job.get_result_ttl(worker.default_result_ttl), pipeline=pipe, remove_from_queue=False)
        worker.cleanup_execution(job, pipeline=pipe, execution=running.execution)
        _ended(pipe, job, "canceled")
        pipe.execute()
    return True


def expired(worker: BaseWorker, job: Job, queue: Queue, pipe) -> str:
    """A pulled job past its deadline: never run, failed with code `expired`; returns the message.
    `pipe` WATCHes the job: WatchError if it changed meanwhile (the reaper may have expired it)."""
    message = _mark_expired(job)
    pipe.multi()
    _fail(pipe, job, f"JobExpired: {message}", worker.name)
    worker.increment_failed_job_count(pipe)
    leave_intermediate(pipe, queue, job.id)
    _ended(pipe, job, "expired")
    pipe.execute()
    return message


def expire_queued(conn: Redis, queue: Queue, job_id: str) -> bool:
    """A job still waiting in `queue` past its deadline: taken off the queue and recorded as
    expired, so that its end is announced and its webhook sent even when no worker of its model
    pulls it any more (the reaper calls this). False when it is not (any more) a queued, overdue
    job; a worker that pulls it meanwhile finds it ended and drops it (it WATCHes the job too)."""
    with conn.pipeline() as pipe:
        try:
            pipe.watch(Job.key_for(job_id))
            try:
                job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)   # read after the WATCH
            except NoSuchJobError:
                return False
            if job.get_status(refresh=False) != JobStatus.QUEUED or not is_expired(job):
                return False
            message = _mark_expired(job)
            pipe.multi()
            queue.remove(job.id, pipeline=pipe)
            _fail(pipe, job, f"JobExpired: {message}", worker_name="")
            _ended(pipe, job, "expired")
            pipe.execute()
            return True
        except WatchError:
            return False


def _mark_expired(job: Job) -> str:
    waited = time.time() - job.enqueued_at.timestamp() if job.enqueued_at else float("nan")
    message = f"waited {waited:.1f}s in the queue, past its deadline"
    job.meta.update(error={"code": "expired", "message": message})
    job.ended_at = now()
    return message


def _fail(pipe, job: Job, exc_string: str, worker_name: str) -> None:
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    job.save(pipeline=pipe)
    job.failed_job_registry.add(job, ttl=job.failure_ttl, exc_string=exc_string, pipeline=pipe)
    Result.create_failure(job, job.failure_ttl, exc_string=exc_string, worker_name=worker_name, pipeline=pipe)


def _end_execution(worker: BaseWorker, pipe, running, success: bool) -> None:
    worker.cleanup_execution(running.job, pipeline=pipe, execution=running.execution)
    if success:
        worker.increment_successful_job_count(pipe)
    else:
        worker.increment_failed_job_count(pipe)
    started = running.job.started_at
    worker.increment_total_working_time(running.job.ended_at - started if started else timedelta(0), pipe)


def _ended(pipe, job: Job, status: str) -> None:
    """The bookkeeping of any ending, on the ending's pipeline (webhook event and end notice included)."""
    pipe.delete(keys.CANCEL_KEY.format(job.id))
    webhooks.record(pipe, job, status)
    notify.announce_end(pipe, job.id)
    if (job.meta or {}).get("api_key"):
        release_slot(pipe, job.meta["api_key"], job.id)
    ended, enqueued, started = job.ended_at, job.enqueued_at, job.started_at
    latency = (ended - enqueued).total_seconds() if ended and enqueued else None
    wait = (started - enqueued).total_seconds() if started and enqueued and status != "expired" else None
    meta = job.meta or {}
    record_timings(pipe, meta.get("model", ""), status, latency, wait, meta.get("priority") or DEFAULT_LANE,
                   {**meta["usage"], "key": usage.key_of(job)} if status == "succeeded" and meta.get("usage") else None)


def record_timings(conn, model: str, status: str, latency_s: float | None, queue_wait_s: float | None,
                   lane: str = DEFAULT_LANE, job_usage: dict | None = None) -> None:
    """Leave one finished job's timings (and a succeeded job's usage with its key) for the API's
    metrics (app.jobs.read.drain_finished); conn is normally the ending's pipeline."""
    item = json.dumps({"model": model, "status": status, "latency_s": latency_s, "queue_wait_s": queue_wait_s,
                       "lane": lane, "usage": job_usage})
    conn.rpush(keys.TIMINGS_KEY, item)
    conn.ltrim(keys.TIMINGS_KEY, -keys.TIMINGS_CAP, -1)
