"""Who owns a running job, and what happens to jobs whose worker is gone (Redis/RQ protocol).

Ownership (fencing): a worker that starts a job writes a fresh random token in the job's hash
(`star_owner`). Everything the worker later writes for that job is conditional on the token, in
one Lua script: progress (`scale_boundary`) and, above all, the claim that precedes recording
the outcome (`claim`: token -> `done:<token>`). Whoever takes a job away from a worker (the reaper,
a drain past its grace) first removes the token atomically (`_FENCE`), so a worker presumed dead
that comes back can neither publish images for the job nor record any outcome: a job's images are
published by exactly one attempt, although the job may run more than once (at-least-once).

The reaper (`reap`, run by live workers every heartbeat, one at a time under a Redis lock) finds
jobs in each queue's StartedJobRegistry whose worker's registry entry (`star:worker:<name>`, TTL
STAR_WORKER_DEADLINE_S) has expired, and puts them back at the front of their queue, counting
`star_requeues` (mirrored in meta `requeues`); past STAR_MAX_REQUEUES the job fails with code
`worker_lost`. It also returns jobs stranded in RQ's intermediate list (taken by a worker that
died before marking them started).

RQ's own cleanup of the StartedJobRegistry fails a job whose execution heartbeat is older than
its TTL (AbandonedJobError). Workers give executions `rq_execution_ttl(deadline)` = 2 x deadline
+ 60 s, and run the reaper before RQ's maintenance, so the reaper acts first; a job failed by RQ
anyway (no worker alive for that long, then `rq info`) reads as `worker_lost` in the API.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from redis import Redis, ResponseError, WatchError
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.utils import now, utcformat

from app import queue as q

log = logging.getLogger(__name__)
OWNER_FIELD = "star_owner"
REQUEUES_FIELD = "star_requeues"
REAPER_LOCK = "star:reaper:lock"
STRANDED_KEY = "star:stranded:{}"     # hash: job id -> first seen in the intermediate list

_CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'star_owner')
if owner == ARGV[1] or owner == 'done:' .. ARGV[1] then
  redis.call('HSET', KEYS[1], 'star_owner', 'done:' .. ARGV[1])
  return 1
end
return 0
"""
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'star_owner') ~= ARGV[1] then return 2 end
redis.call('HSET', KEYS[1], 'meta', ARGV[2])
return redis.call('EXISTS', KEYS[2])
"""
_FENCE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'started' then return -1 end
if (redis.call('HGET', KEYS[1], 'star_owner') or '') ~= ARGV[1] then return -1 end
redis.call('HDEL', KEYS[1], 'star_owner')
if ARGV[2] == '1' then return redis.call('HINCRBY', KEYS[1], 'star_requeues', 1) end
return tonumber(redis.call('HGET', KEYS[1], 'star_requeues') or '0')
"""


def rq_execution_ttl(deadline_s: float) -> int:
    """TTL of RQ's execution heartbeats: well past the point where the reaper acts."""
    return int(2 * deadline_s + 60)


# ---------------------------------------------------------------- the owning worker

def new_token() -> str:
    return uuid.uuid4().hex


def own(pipe, job: Job, token: str) -> None:
    """Inside the transaction that starts a job: make `token` its owner."""
    pipe.hset(job.key, OWNER_FIELD, token)


def claim(conn: Redis, job: Job, token: str) -> bool:
    """The owner's right to record the outcome, taken once (idempotent for the same token);
    False when the job was taken away (re-queued) meanwhile."""
    return bool(conn.eval(_CLAIM, 1, job.key, token))


def scale_boundary(conn: Redis, jobs: list[Job], tokens: dict[str, str], k: int, scales: int
                   ) -> tuple[set[str], set[str]]:
    """Record progress k/S on the jobs this worker still owns; returns (ids whose cancel flag is
    set, ids no longer owned: stop computing them)."""
    with conn.pipeline(transaction=False) as pipe:
        for job in jobs:
            job.meta["progress"] = {"scale": k, "scales": scales}
            pipe.eval(_PROGRESS, 2, job.key, q.CANCEL_KEY.format(job.id), tokens[job.id],
                      q.SERIALIZER.dumps(job.meta))
        answers = pipe.execute()
    canceled = {job.id for job, a in zip(jobs, answers) if a == 1}
    lost = {job.id for job, a in zip(jobs, answers) if a == 2}
    return canceled, lost


def release(conn: Redis, job: Job, token: str, executions: list[Execution], *, count: bool,
            max_requeues: int, reason: str) -> str | None:
    """Take a job away from its owner (token) and put it back at the front of its queue, or fail
    it with `worker_lost` past max_requeues when `count`; its RQ executions end either way.
    Returns what was done, or None if the token no longer owns the job."""
    n = conn.eval(_FENCE, 1, job.key, token, "1" if count else "0")
    if n < 0:
        return None
    if conn.exists(q.CANCEL_KEY.format(job.id)):
        _cancel(conn, job, executions)
        return "canceled"
    if count and n > max_requeues:
        _fail_lost(conn, job, executions, n, reason)
        return "failed"
    _requeue_front(conn, job, executions, n)
    return "requeued"


def _requeue_front(conn: Redis, job: Job, executions: list[Execution], requeues: int) -> None:
    queue = Queue(job.origin, connection=conn, serializer=q.SERIALIZER)
    enqueued_at = job.enqueued_at
    job.meta.update(progress=None, requeues=requeues)
    deadline_at = job.meta.get("deadline_at")
    if deadline_at and enqueued_at:   # a fresh deadline: it was started in time, it must not expire now
        job.meta["deadline_at"] = max(float(deadline_at), time.time() + float(deadline_at) - enqueued_at.timestamp())
    job.started_at = job.ended_at = None
    with conn.pipeline() as pipe:
        queue.enqueue_job(job, pipeline=pipe, at_front=True)   # first: it starts the transaction
        for execution in executions:
            execution.delete(job=job, pipeline=pipe)
        if enqueued_at:   # keep the original time: queue wait and latency count from the POST
            pipe.hset(job.key, "enqueued_at", utcformat(enqueued_at))
        pipe.execute()
    job.enqueued_at = enqueued_at


def _fail_lost(conn: Redis, job: Job, executions: list[Execution], requeues: int, reason: str) -> None:
    message = (f"its worker was lost ({reason}) {requeues} time(s) while running it; "
               f"given up after {requeues - 1} re-queue(s)")
    job.meta.update(progress=None, requeues=requeues - 1, error={"code": "worker_lost", "message": message})
    job.ended_at = now()
    with conn.pipeline() as pipe:
        for execution in executions:
            execution.delete(job=job, pipeline=pipe)
        pipe.hset(job.key, mapping={"meta": q.SERIALIZER.dumps(job.meta), "ended_at": utcformat(job.ended_at)})
        record_job_failure(job, f"WorkerLost: {message}", pipe)
        pipe.execute()
    q.job_ended(conn, job)


def _cancel(conn: Redis, job: Job, executions: list[Execution]) -> None:
    """A job whose cancel was requested while its worker died: canceled, not re-run."""
    job.meta.update(progress=None)
    with conn.pipeline() as pipe:
        for execution in executions:
            execution.delete(job=job, pipeline=pipe)
        pipe.hset(job.key, mapping={"meta": q.SERIALIZER.dumps(job.meta), "ended_at": utcformat(now())})
        pipe.execute()
    try:
        job.cancel()
    except InvalidJobOperation:
        pass
    job.cleanup(job.result_ttl or q.CANCEL_FLAG_TTL_S)
    q.clear_cancel_flag(conn, job.id)
    q.job_ended(conn, job)


# ---------------------------------------------------------------- the reaper

@dataclass
class Outcome:
    job_id: str
    worker: str
    action: str      # requeued, failed, canceled, rescued


def reap(conn: Redis, *, max_requeues: int, deadline_s: float, lock_s: float) -> list[Outcome]:
    """One pass over every star queue, by at most one process per `lock_s` (Redis lock)."""
    if not conn.set(REAPER_LOCK, uuid.uuid4().hex, nx=True, px=max(100, int(lock_s * 1000))):
        return []
    if redis_uptime(conn) < deadline_s:
        return []   # Redis just (re)started: live workers have not re-registered yet
    outcomes: list[Outcome] = []
    for queue in Queue.all(connection=conn, serializer=q.SERIALIZER):
        if queue.name.startswith(q.QUEUE_PREFIX):
            outcomes += _reap_started(conn, queue, max_requeues)
            outcomes += _rescue_stranded(conn, queue, deadline_s)
    return outcomes


def redis_uptime(conn: Redis) -> float:
    """Seconds since Redis started (infinite where INFO is not allowed, e.g. some managed Redis)."""
    try:
        return float(conn.info("server").get("uptime_in_seconds", 0))
    except ResponseError:
        return float("inf")


def _reap_started(conn: Redis, queue: Queue, max_requeues: int) -> list[Outcome]:
    registry = StartedJobRegistry(queue.name, connection=conn, serializer=q.SERIALIZER)
    entries: dict[str, list[Execution]] = {}
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        entries.setdefault(job_id, []).append(Execution(execution_id, job_id, connection=conn))
    outcomes = []
    for job_id, executions in entries.items():
        try:
            job = Job.fetch(job_id, connection=conn, serializer=q.SERIALIZER)
        except NoSuchJobError:
            continue
        worker = job.worker_name or ""
        if job.get_status(refresh=False) != JobStatus.STARTED or (worker and worker_alive(conn, worker)):
            continue
        owner = (conn.hget(job.key, OWNER_FIELD) or b"").decode()
        if owner.startswith("done:"):
            continue   # its outcome is being recorded
        action = release(conn, job, owner, executions, count=True, max_requeues=max_requeues,
                         reason="no heartbeat")
        if action:
            log.warning("job %s: worker %s is gone; job %s", job.id, worker or "?", action)
            outcomes.append(Outcome(job.id, worker, action))
    return outcomes


def worker_alive(conn: Redis, name: str) -> bool:
    return bool(conn.exists(q.WORKER_KEY.format(name)))


def _rescue_stranded(conn: Redis, queue: Queue, deadline_s: float) -> list[Outcome]:
    """Jobs left in RQ's intermediate list for longer than the deadline go back to the queue."""
    key = STRANDED_KEY.format(queue.name)
    present = [i.decode() for i in conn.lrange(queue.intermediate_queue_key, 0, -1)]
    seen = {k.decode(): float(v) for k, v in conn.hgetall(key).items()}
    gone = [job_id for job_id in seen if job_id not in present]
    if gone:
        conn.hdel(key, *gone)
    outcomes, now_s = [], time.time()
    for job_id in present:
        if job_id not in seen:
            conn.hset(key, job_id, now_s)
            conn.expire(key, 86400)
        elif now_s - seen[job_id] > deadline_s and _rescue(conn, queue, job_id):
            conn.hdel(key, job_id)
            log.warning("job %s: stranded in %s's intermediate list; back on the queue", job_id, queue.name)
            outcomes.append(Outcome(job_id, "", "rescued"))
    return outcomes


def _rescue(conn: Redis, queue: Queue, job_id: str) -> bool:
    """Move a still-queued job from the intermediate list to the queue front. The write to the
    job's hash makes a worker that is starting it right now look again (it WATCHes the hash)."""
    job_key = Job.key_for(job_id)
    with conn.pipeline() as pipe:
        try:
            pipe.watch(job_key, queue.intermediate_queue_key)
            status = pipe.hget(job_key, "status")
            if status != JobStatus.QUEUED.value.encode() or pipe.lpos(queue.intermediate_queue_key, job_id) is None:
                pipe.unwatch()
                return False
            pipe.multi()
            pipe.lrem(queue.intermediate_queue_key, 1, job_id)
            pipe.lpush(queue.key, job_id)
            pipe.hset(job_key, "star_rescued_at", utcformat(now()))
            pipe.execute()
            return True
        except WatchError:
            return False
