"""What the job protocol relies on in RQ beyond its documented calls, in one place, each fact checked
against the pinned RQ by tests/app/test_rq_adapter.py (a change in RQ fails there, by name).

Everything else goes through RQ's public API: Queue (enqueue_call, enqueue_job, push_job_id,
count, get_job_position, dequeue_any), Job (fetch, fetch_many, get_status, set_status, save,
cancel, cleanup, heartbeat, prepare_for_execution, return_value, latest_result), the registries,
Execution, Result, and the worker's public methods. The facts below are about RQ's storage:

- a queue is a Redis list at `queue.key` (LLEN is its length, used inside our transactions and
  the admission script, where `queue.count` cannot run);
- `dequeue_any` of one queue moves a job id (LMOVE LEFT RIGHT) from `queue.key` to the list
  `queue.intermediate_queue_key` until a worker starts it (RQ's SimpleWorker removes it there when
  it starts a job; so do we). Our lane-ordered dequeue (app.jobs.lanes) makes that same move
  itself, for the first non-empty lane (RQ's dequeue of several queues pops without the list);
- a worker's `queue_class.dequeue_any(queues, timeout, ...)` is how RQ's work loop dequeues;
- a job's status is the field `status` of its hash `job.key` (read inside a WATCH transaction);
- a started job's hash has no TTL: RQ's worker PERSISTs it when it starts a job, and so do we, in
  our start transaction;
- fields this service adds to the job hash (app.jobs.keys) survive RQ's writes to it.
"""
from __future__ import annotations

import re

from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.client import Pipeline
from redis.retry import Retry
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import as_text

from app.jobs.keys import QUEUE_PREFIX

SERIALIZER = JSONSerializer


def connect(url: str, socket_timeout: float | None = 5.0, retries: int | None = None) -> Redis:
    """A client; `retries` bounds redis-py's reconnect attempts (the API answers 503 quickly
    while Redis is down instead of retrying for seconds)."""
    options = {}
    if retries is not None:
        options["retry"] = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries)
    return Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=socket_timeout, **options)


def queue_name(model: str) -> str:
    return QUEUE_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", model)


def get_queue(conn: Redis, model: str) -> Queue:
    return Queue(queue_name(model), connection=conn, serializer=SERIALIZER)


def star_queues(conn: Redis) -> list[Queue]:
    """Every star queue RQ knows about."""
    return [q for q in Queue.all(connection=conn, serializer=SERIALIZER) if q.name.startswith(QUEUE_PREFIX)]


def queue_length(pipe: Pipeline, queue: Queue) -> None:
    """Queue LLEN of the queue's list on a pipeline (its answer is the queue's length)."""
    pipe.llen(queue.key)


def leave_intermediate(pipe: Pipeline | Redis, queue: Queue, job_id: str) -> None:
    """Remove a dequeued job id from RQ's intermediate list (the job starts, ends or goes back)."""
    pipe.lrem(queue.intermediate_queue_key, 1, job_id)


def persist_record(pipe: Pipeline, job: Job) -> None:
    """The started job's record no longer expires (the TTL its enqueue gave a never-started job)."""
    pipe.persist(job.key)


def give_back(conn: Redis, queue: Queue, job_id: str, also=None) -> None:
    """A dequeued job back at the front of its queue, as if it had never been taken;
    `also(pipe, queue name)` adds its writes to the same transaction."""
    with conn.pipeline() as pipe:
        leave_intermediate(pipe, queue, job_id)
        queue.push_job_id(job_id, pipeline=pipe, at_front=True)
        if also is not None:
            also(pipe, queue.name)
        pipe.execute()


def intermediate_has(pipe: Pipeline, queue: Queue, job_id: str) -> bool:
    """Whether job_id is in the queue's intermediate list (on a WATCHing pipeline: read at once)."""
    return pipe.lpos(queue.intermediate_queue_key, job_id) is not None


def stored_status(pipe: Pipeline, job_key: str) -> str | None:
    """The job's stored status (on a WATCHing pipeline: read at once); None if the record is gone."""
    raw = pipe.hget(job_key, "status")
    return as_text(raw) if raw is not None else None
