"""The reaper: jobs whose worker is gone go back to their queue (app.jobs.release).

One pass (`reap`), by at most one process per period (a Redis lock; live workers run it every
heartbeat, the API every STAR_REAPER_S), looks at each star queue (every lane of every model):
- jobs in the StartedJobRegistry whose worker's registry entry (TTL STAR_WORKER_DEADLINE_S) has
  expired are released: re-queued at the front, counting a requeue; past STAR_MAX_REQUEUES failed
  as `worker_lost`; canceled if their cancel was requested;
- jobs left in RQ's intermediate list longer than the deadline (taken by a worker that died
  before starting them) go back to the front of the queue;
- jobs waiting past their own deadline (`deadline_at`) among the first OVERDUE_SCAN of the queue
  (the oldest: new jobs go to the back) are recorded as expired (finish.expire_queued), so that
  their end is announced and their webhook sent even when no worker of their model is left to
  pull them (a worker that pulls one records it the same way).

RQ's own cleanup fails a started job whose execution heartbeat is older than its TTL
(AbandonedJobError) and a job stuck in the intermediate list for a minute. Workers give executions
`rq_execution_ttl(deadline)` = 2 x deadline + 60 s and run the reaper before RQ's maintenance, so
the reaper acts first; a job failed by RQ anyway (no worker alive for that long) reads as
`worker_lost` in the API (app.jobs.read).
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from redis import Redis, ResponseError, WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.utils import as_text, now, utcformat

from app.jobs import finish, keys
from app.jobs.lanes import wake
from app.jobs.release import release
from app.jobs.rq_adapter import SERIALIZER, intermediate_has, leave_intermediate, star_queues, stored_status
from app.jobs.workers import worker_alive

log = logging.getLogger(__name__)
OVERDUE_SCAN = 100   # queued jobs looked at per queue and pass, from the front


def rq_execution_ttl(deadline_s: float) -> int:
    """TTL of RQ's execution heartbeats: well past the point where the reaper acts."""
    return int(2 * deadline_s + 60)


@dataclass
class Outcome:
    job_id: str
    worker: str
    action: str      # requeued, failed, canceled, rescued, expired


def reap(conn: Redis, *, max_requeues: int, deadline_s: float, lock_s: float) -> list[Outcome]:
    """One pass over every star queue, by at most one process per `lock_s` (Redis lock)."""
    if not conn.set(keys.REAPER_LOCK, uuid.uuid4().hex, nx=True, px=max(100, int(lock_s * 1000))):
        return []
    if redis_uptime(conn) < deadline_s:
        return []   # Redis just (re)started: live workers have not re-registered yet
    outcomes: list[Outcome] = []
    for queue in star_queues(conn):
        outcomes += _reap_started(conn, queue, max_requeues)
        outcomes += _rescue_stranded(conn, queue, deadline_s)
        outcomes += _expire_overdue(conn, queue)
    return outcomes


def redis_uptime(conn: Redis) -> float:
    """Seconds since Redis started (infinite where INFO is not allowed, e.g. some managed Redis)."""
    try:
        return float(conn.info("server").get("uptime_in_seconds", 0))
    except ResponseError:
        return float("inf")


def _reap_started(conn: Redis, queue: Queue, max_requeues: int) -> list[Outcome]:
    registry = StartedJobRegistry(queue.name, connection=conn, serializer=SERIALIZER)
    entries: dict[str, list[Execution]] = {}
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        entries.setdefault(job_id, []).append(Execution(execution_id, job_id, connection=conn))
    outcomes = []
    for job_id, executions in entries.items():
        try:
            job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
        except NoSuchJobError:
            continue
        worker = job.worker_name or ""
        if job.get_status(refresh=False) != JobStatus.STARTED or (worker and worker_alive(conn, worker)):
            continue
        owner = as_text(conn.hget(job.key, keys.OWNER_FIELD) or b"")
        if owner.startswith("done:"):
            continue   # its outcome is being recorded
        action = release(conn, job, owner, executions, count=True, max_requeues=max_requeues,
                         reason="no heartbeat")
        if action:
            log.warning("job %s: worker %s is gone; job %s", job.id, worker or "?", action)
            outcomes.append(Outcome(job.id, worker, action))
    return outcomes


def _rescue_stranded(conn: Redis, queue: Queue, deadline_s: float) -> list[Outcome]:
    """Jobs left in RQ's intermediate list for longer than the deadline go back to the queue."""
    key = keys.STRANDED_KEY.format(queue.name)
    present = queue.intermediate_queue.get_job_ids()
    seen = {as_text(k): float(v) for k, v in conn.hgetall(key).items()}
    gone = [job_id for job_id in seen if job_id not in present]
    if gone:
        conn.hdel(key, *gone)
    outcomes, now_s = [], time.time()
    for job_id in present:
        if job_id not in seen:
            conn.hset(key, job_id, now_s)
            conn.expire(key, keys.STRANDED_TTL_S)
        elif now_s - seen[job_id] > deadline_s and _rescue(conn, queue, job_id):
            conn.hdel(key, job_id)
            log.warning("job %s: stranded in %s's intermediate list; back on the queue", job_id, queue.name)
            outcomes.append(Outcome(job_id, "", "rescued"))
    return outcomes


def _expire_overdue(conn: Redis, queue: Queue) -> list[Outcome]:
    """Record the overdue jobs among the first OVERDUE_SCAN of the queue as expired."""
    job_ids = queue.get_job_ids(0, OVERDUE_SCAN)
    deadlines = [_deadline(job) for job in Job.fetch_many(job_ids, connection=conn, serializer=SERIALIZER)]
    outcomes, now_s = [], time.time()
    for job_id, deadline in zip(job_ids, deadlines):
        if deadline is not None and now_s > deadline and finish.expire_queued(conn, queue, job_id):
            log.info("job %s: waited in %s past its deadline; recorded as expired", job_id, queue.name)
            outcomes.append(Outcome(job_id, "", "expired"))
    return outcomes


def _deadline(job: Job | None) -> float | None:
    deadline = (job.meta or {}).get("deadline_at") if job is not None else None
    return float(deadline) if deadline is not None else None


def _rescue(conn: Redis, queue: Queue, job_id: str) -> bool:
    """Move a still-queued job from the intermediate list to the queue front. The write to the
    job's hash makes a worker that is starting it right now look again (it WATCHes the hash)."""
    job_key = Job.key_for(job_id)
    with conn.pipeline() as pipe:
        try:
            pipe.watch(job_key, queue.intermediate_queue_key)
            if stored_status(pipe, job_key) != JobStatus.QUEUED.value or not intermediate_has(pipe, queue, job_id):
                pipe.unwatch()
                return False
            pipe.multi()
            leave_intermediate(pipe, queue, job_id)
            queue.push_job_id(job_id, pipeline=pipe, at_front=True)
            wake(pipe, queue.name)
            pipe.hset(job_key, keys.RESCUED_FIELD, utcformat(now()))
            pipe.execute()
            return True
        except WatchError:
            return False
