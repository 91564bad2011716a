"""Claim (worker side): take jobs off a model's lane queues, highest lane first, and start them.

A worker pulls a job (app.jobs.lanes.pull_any: the id moves to its lane's RQ intermediate list,
as RQ's dequeue does), then starts it in
one transaction that WATCHes the job's record, so that a start excludes a concurrent cancel from
the API and a rescue by the reaper: if the job is no longer queued (canceled, or its record
gone) it is dropped; if it waited past its deadline it ends as expired without running. Starting
writes what RQ's own worker writes (execution record, StartedJobRegistry, heartbeats, status
`started`) plus a fresh owner token (OWNER_FIELD): from now on this attempt alone may record the
job's progress and outcome (the fence: app.jobs.release). Request fields left out (None, or
"auto": the sampler) get the model's defaults here, once; meta `sampling` records the values that
run (GET /jobs/{id}).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from redis import WatchError
from rq import Queue
from rq.exceptions import DequeueTimeout, InvalidJobOperation
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.utils import now
from rq.worker import BaseWorker

from app.jobs import finish, webhooks
from app.jobs.keys import OWNER_FIELD
from app.jobs.lanes import pull_any, wake
from app.jobs.rq_adapter import give_back, leave_intermediate, persist_record
from app.jobs.states import is_expired


@dataclass
class Running:
    """A started job: what the model needs (params, images) and what ending it needs."""

    job: Job
    queue: Queue
    execution: Execution
    params: dict      # the request with every field filled (API names)
    images: int
    token: str        # this attempt's owner token


@dataclass(frozen=True)
class Expired:
    """A pulled job that waited past its deadline: recorded as expired, never run."""

    job_id: str
    message: str


def job_images(job: Job) -> int:
    return int((job.meta or {}).get("images") or job.kwargs.get("n", 1))


UNSET = (None, "auto")   # a request field left to the model: absent, null, or "auto" (the sampler)


def with_defaults(params: dict, defaults: dict) -> dict:
    """params with every field of `defaults` that is absent, None or "auto" taken from it (explicit
    values win)."""
    return {**params, **{name: value for name, value in defaults.items() if params.get(name) in UNSET}}


def pull(worker: BaseWorker, queues: list[Queue], timeout_s: float) -> Job | None:
    """The next job of the first non-empty queue (the lanes, highest first), waiting up to
    timeout_s (below 10 ms: not at all)."""
    wait = timeout_s if timeout_s >= 0.01 else None
    try:
        result = pull_any(worker.connection, queues, wait, job_class=worker.job_class)
    except DequeueTimeout:
        return None
    return result[0] if result else None


def put_back(worker: BaseWorker, queue: Queue, job: Job) -> None:
    """A pulled job that does not fit the batch: back at the front of its queue (another idle
    worker of the model may take it)."""
    give_back(worker.connection, queue, job.id, wake)


def start(worker: BaseWorker, job: Job, queue: Queue, defaults: dict) -> Running | Expired | None:
    """Start a pulled job (see the module docstring); Expired, or None when it must not run."""
    token = uuid.uuid4().hex
    with worker.connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(job.key)
                try:
                    status = job.get_status(refresh=True)   # after the WATCH: a change since aborts the EXEC
                except InvalidJobOperation:
                    status = None                           # its record is gone
                if status != JobStatus.QUEUED:
                    pipe.multi()
                    leave_intermediate(pipe, queue, job.id)
                    pipe.execute()
                    return None
                if is_expired(job):
                    return Expired(job.id, finish.expired(worker, job, queue, pipe))
                params = with_defaults(dict(job.kwargs), defaults)
                job.meta["sampling"] = {name: params[name] for name in defaults}
                execution = _start_writes(worker, pipe, job, queue, token)
                break
            except WatchError:
                continue   # the API or the reaper touched it: look again
    return Running(job, queue, execution, params, job_images(job), token)


def _start_writes(worker: BaseWorker, pipe, job: Job, queue: Queue, token: str) -> Execution:
    ttl = worker.get_heartbeat_ttl(job)
    pipe.multi()
    execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
    worker.heartbeat(ttl, pipeline=pipe)
    job.heartbeat(now(), ttl, pipeline=pipe)
    job.prepare_for_execution(worker.name, pipeline=pipe)
    job.save(pipeline=pipe)                  # meta with the sampling values
    pipe.hset(job.key, OWNER_FIELD, token)
    persist_record(pipe, job)                # as RQ's worker does: a started record no longer expires
    leave_intermediate(pipe, queue, job.id)
    webhooks.record(pipe, job, webhooks.RUNNING)   # only if its webhook asked for `running`
    pipe.execute()
    worker.executions[execution.id] = execution
    return execution
