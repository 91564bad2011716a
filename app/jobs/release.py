"""Release: take a started job away from the attempt that owns it (the fence) and put it back.

Whoever takes a job away from a worker (the reaper, for a worker presumed dead; the worker itself,
for a batch it gives up: drain past its grace, device error, shutdown) first removes the owner
token atomically (FENCE), so an attempt presumed dead that comes back can neither record progress
nor claim an outcome: a job's images are published by exactly one attempt, although the job may
run more than once (at-least-once). Then, in this order:
- its cancel was requested meanwhile: it ends canceled, it is not re-run;
- counted (a lost worker) past STAR_MAX_REQUEUES: it fails with code `worker_lost`;
- else it goes back to the front of its queue (its lane) with a fresh deadline (`requeues` counts lost workers).
"""
from __future__ import annotations

import time

from redis import Redis
from rq import Queue
from rq.exceptions import InvalidJobOperation
from rq.executions import Execution
from rq.job import Job
from rq.job_lifecycle import record_job_failure
from rq.utils import now

from app.jobs import keys, notify, webhooks
from app.jobs.admission import release_slot
from app.jobs.lanes import wake
from app.jobs.rq_adapter import SERIALIZER


def release(conn: Redis, job: Job, token: str, executions: list[Execution], *, count: bool,
            max_requeues: int, reason: str) -> str | None:
    """Fence, then cancel, fail or re-queue (see above); returns what was done, or None if `token`
    no longer owns the job. Its RQ executions end either way."""
    n = conn.eval(keys.FENCE, 1, job.key, token, "1" if count else "0")
    if n < 0:
        return None
    if conn.exists(keys.CANCEL_KEY.format(job.id)):
        _cancel(conn, job, executions)
        return "canceled"
    if count and n > max_requeues:
        _fail_lost(conn, job, executions, n, reason)
        return "failed"
    _requeue_front(conn, job, executions, n)
    return "requeued"


def _requeue_front(conn: Redis, job: Job, executions: list[Execution], requeues: int) -> None:
    queue = Queue(job.origin, connection=conn, serializer=SERIALIZER)
    enqueued_at = job.enqueued_at
    job.meta.update(progress=None, requeues=requeues)
    deadline_at = job.meta.get("deadline_at")
    if deadline_at and enqueued_at:   # a fresh deadline: it was started in time, it must not expire now
        job.meta["deadline_at"] = max(float(deadline_at), time.time() + float(deadline_at) - enqueued_at.timestamp())
    job.started_at = job.ended_at = None
    with conn.pipeline() as pipe:
        queue.enqueue_job(job, pipeline=pipe, at_front=True)   # first: it starts the transaction
        wake(pipe, queue.name)
        for execution in executions:
            execution.delete(job=job, pipeline=pipe)
        job.enqueued_at = enqueued_at or job.enqueued_at   # the original time: queue wait and latency count from the POST
        job.save(pipeline=pipe)
        pipe.execute()


def _fail_lost(conn: Redis, job: Job, executions: list[Execution], requeues: int, reason: str) -> None:
    message = (f"its worker was lost ({reason}) {requeues} time(s) while running it; "
               f"given up after {requeues - 1} re-queue(s)")
    job.meta.update(progress=None, requeues=requeues - 1, error={"code": "worker_lost", "message": message})
    job.ended_at = now()
    with conn.pipeline() as pipe:
        for execution in executions:
            execution.delete(job=job, pipeline=pipe)
        job.save(pipeline=pipe)
        record_job_failure(job, f"WorkerLost: {message}", pipe)
        _left(pipe, job, "failed")
        pipe.execute()


def _cancel(conn: Redis, job: Job, executions: list[Execution]) -> None:
    """A job whose cancel was requested while its worker was lost: canceled, not re-run."""
    job.meta.update(progress=None)
    job.ended_at = now()
    with conn.pipeline() as pipe:
        for execution in executions:
            execution.delete(job=job, pipeline=pipe)
        job.save(pipeline=pipe)
        pipe.execute()
    try:
        job.cancel()
    except InvalidJobOperation:
        pass
    with conn.pipeline() as pipe:
        job.cleanup(job.result_ttl or keys.CANCEL_FLAG_TTL_S, pipeline=pipe)
        _left(pipe, job, "canceled")
        pipe.execute()


def _left(pipe, job: Job, status: str) -> None:
    pipe.delete(keys.CANCEL_KEY.format(job.id))
    webhooks.record(pipe, job, status)
    notify.announce_end(pipe, job.id)
    if (job.meta or {}).get("api_key"):
        release_slot(pipe, job.meta["api_key"], job.id)
