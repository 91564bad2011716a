"""The Redis/RQ protocol between the API and the workers, in one place.

- One RQ queue per model: `star-<model>`; every request is one RQ job calling JOB_FUNC with the
  request parameters as kwargs (JSON serializer), so `rq info` shows queues, jobs and workers.
- Job meta (written by the API at enqueue, then only by the worker): `model`, `images` (n),
  `deadline_at` (unix time after which a still-queued job is `expired`), `sampling` (the
  guidance_scale, top_k, top_p, temperature the worker runs it with: the request's, else the
  model's defaults; written when the job starts), `progress` ({scale, scales}), `model_s`,
  `error` ({code, message}).
- Cancel flags: `star:cancel:<job id>`; a queued job is canceled at once with RQ's cancel, a
  running one stops at its next scale boundary when the worker sees the flag.
- Worker registry: `star:worker:<name>` (JSON, TTL'd heartbeat) indexed by the set `star:workers`;
  an entry carries its model's sampling defaults (`sampling`) for GET /models.
- Finished-job timings for the API's histograms: the list `star:metrics:job_timings`.
- Admission: `star:admit:<queue>` (sorted set of POSTs between the limit check and the push), so
  that queue depth + reservations never exceed the queue limit however many POSTs race.
- Per-key active jobs: `star:active:<key name>` (app.auth), left by `job_ended` on every ending.
- Ownership of running jobs, re-queueing of abandoned ones: app.recovery.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime

from redis import Redis, RedisError, WatchError
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

JOB_FUNC = "worker.tasks.run_job"
SERIALIZER = JSONSerializer
QUEUE_PREFIX = "star-"
WORKERS_SET = "star:workers"
WORKER_KEY = "star:worker:{}"
CANCEL_KEY = "star:cancel:{}"
CANCEL_FLAG_TTL_S = 86400
TIMINGS_KEY = "star:metrics:job_timings"
TIMINGS_CAP = 10000
ADMIT_KEY = "star:admit:{}"
ADMIT_HOLD_S = 30          # a reservation left by a crashed API process lapses after this
ACTIVE_KEY = "star:active:{}"
JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ACCEPTING_STATES = ("starting", "ready", "busy")   # a POST may be queued for these workers
READY_STATES = ("ready", "busy")                    # /readyz needs one of these
WAITING = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED)


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


# ---------------------------------------------------------------- worker registry

@dataclass
class WorkerEntry:
    name: str
    model: str
    state: str                      # starting, ready, busy, draining
    size: int | None = None         # known once the model is loaded
    queue: str | None = None
    max_batch: int = 1
    max_wait_ms: int = 0
    device: str = ""
    host: str = ""
    pid: int = 0
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = 0.0
    sampling: dict | None = None    # the model's sampling defaults (app.schemas), known once loaded


_ENTRY_FIELDS = {f.name for f in fields(WorkerEntry)}


def publish_worker(conn: Redis, entry: WorkerEntry, ttl_s: float) -> None:
    entry.heartbeat_at = time.time()
    with conn.pipeline() as pipe:
        pipe.set(WORKER_KEY.format(entry.name), json.dumps(asdict(entry)), ex=max(1, math.ceil(ttl_s)))
        pipe.sadd(WORKERS_SET, entry.name)
        pipe.execute()


def remove_worker(conn: Redis, name: str) -> None:
    with conn.pipeline() as pipe:
        pipe.delete(WORKER_KEY.format(name))
        pipe.srem(WORKERS_SET, name)
        pipe.execute()


def live_workers(conn: Redis) -> list[WorkerEntry]:
    """Workers whose heartbeat key has not expired (stale index members are pruned)."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in conn.smembers(WORKERS_SET))
    if not names:
        return []
    values = conn.mget([WORKER_KEY.format(name) for name in names])
    entries, stale = [], []
    for name, raw in zip(names, values):
        if raw is None:
            stale.append(name)
        else:
            data = json.loads(raw)   # fields of newer workers that this code does not know are ignored
            entries.append(WorkerEntry(**{k: v for k, v in data.items() if k in _ENTRY_FIELDS}))
    if stale:
        conn.srem(WORKERS_SET, *stale)
    return entries


def served_sizes(entries: Iterable[WorkerEntry]) -> list[int]:
    return sorted({e.size for e in entries if e.size and e.state in ACCEPTING_STATES})


def model_for_size(entries: Iterable[WorkerEntry], size: int) -> str | None:
    """The model serving `size` with the most ready workers (ties: by name), or None."""
    score: dict[str, int] = {}
    for e in entries:
        if e.size == size and e.state in ACCEPTING_STATES:
            score[e.model] = score.get(e.model, 0) + (e.state in READY_STATES)
    return min(score, key=lambda m: (-score[m], m)) if score else None


# ---------------------------------------------------------------- enqueue and read (API side)

def queue_depth(conn: Redis, model: str) -> int:
    return get_queue(conn, model).count


def all_queue_depths(conn: Redis) -> dict[str, int]:
    """Depth of every star queue RQ knows about, by model (queue name without the prefix)."""
    queues = [q for q in Queue.all(connection=conn, serializer=SERIALIZER) if q.name.startswith(QUEUE_PREFIX)]
    return {q.name[len(QUEUE_PREFIX):]: q.count for q in queues}


_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""


def admit(conn: Redis, queue: Queue, job_id: str, limit: int) -> bool:
    """Reserve a place for job_id if the queue holds fewer than `limit` jobs, counting places
    reserved by concurrent POSTs (atomic: a burst of POSTs never overshoots the limit)."""
    now_s = time.time()
    return bool(conn.eval(_ADMIT, 2, queue.key, ADMIT_KEY.format(queue.name), limit, now_s,
                          now_s - ADMIT_HOLD_S, job_id, ADMIT_HOLD_S))


def enqueue(conn: Redis, params: dict, model: str, *, deadline_s: float, result_ttl: int,
            failure_ttl: int, queue_limit: int | None = None, job_id: str | None = None,
            api_key: str | None = None) -> tuple[Job, int | None] | None:
    """Put one request on its model's queue; returns the job and its queue position, or None when
    the queue already holds `queue_limit` jobs."""
    queue = get_queue(conn, model)
    job_id = job_id or str(uuid.uuid4())
    if queue_limit is not None and not admit(conn, queue, job_id, queue_limit):
        return None
    meta = {"model": model, "images": params["n"], "deadline_at": time.time() + deadline_s}
    if api_key:
        meta["api_key"] = api_key
    try:
        with conn.pipeline() as pipe:
            job = queue.enqueue_call(
                JOB_FUNC, kwargs=params, meta=meta, result_ttl=result_ttl, failure_ttl=failure_ttl, job_id=job_id,
                # The worker enforces no RQ timeout (batches run in-process); a never-started job's
                # record expires result_ttl after its deadline.
                timeout=-1, ttl=math.ceil(deadline_s) + result_ttl, pipeline=pipe,
                description=f"star {model}: {params['n']} image(s) of {params['size']}px",
            )
            pipe.zrem(ADMIT_KEY.format(queue.name), job_id)
            pipe.llen(queue.key)   # in the same transaction as the push to the queue's tail
            queued = pipe.execute()[-1]
    except BaseException:
        with contextlib.suppress(RedisError):   # else it lapses after ADMIT_HOLD_S
            conn.zrem(ADMIT_KEY.format(queue.name), job_id)
        raise
    # Its index at the tail right after the push (LPOS would scan the whole queue on every POST).
    return job, max(0, int(queued) - 1)


def job_ended(conn: Redis, job: Job) -> None:
    """Bookkeeping of any ending (succeeded, failed, canceled, expired): free the job's slot of
    its API key's concurrent jobs."""
    name = (job.meta or {}).get("api_key")
    if name:
        conn.srem(ACTIVE_KEY.format(name), job.id)


def public_statuses(conn: Redis, job_ids: list[str]) -> list[str]:
    """Public status of each id ('gone' when its record no longer exists)."""
    jobs = Job.fetch_many(job_ids, connection=conn, serializer=SERIALIZER) if job_ids else []
    return [public_status(job) if job is not None else "gone" for job in jobs]


@dataclass
class JobState:
    """A job as the API reports it (see app.schemas.JobView)."""

    id: str
    status: str
    model: str
    params: dict
    queue_position: int | None = None
    progress: dict | None = None
    cancel_requested: bool = False
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    model_s: float | None = None
    images: list[dict] | None = None
    prompt_truncated: bool | None = None
    error: dict | None = None


def fetch_job(conn: Redis, job_id: str) -> Job | None:
    """One of our jobs, or None for unknown ids and foreign RQ jobs."""
    if not JOB_ID_RE.match(job_id):
        return None
    try:
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    except NoSuchJobError:
        return None
    if not (job.origin or "").startswith(QUEUE_PREFIX) or job.func_name != JOB_FUNC:
        return None
    return job


def public_status(job: Job) -> str:
    status = job.get_status(refresh=False)
    meta = job.meta or {}
    if status in WAITING:
        return "expired" if is_expired(job) else "queued"
    if status == JobStatus.STARTED:
        return "running"
    if status == JobStatus.FINISHED:
        return "succeeded"
    if status in (JobStatus.CANCELED, JobStatus.STOPPED):
        return "canceled"
    if status == JobStatus.FAILED and (meta.get("error") or {}).get("code") == "expired":
        return "expired"
    return "failed"


def is_expired(job: Job) -> bool:
    """Past its deadline (meaningful while the job waits: a started job is never expired)."""
    deadline = (job.meta or {}).get("deadline_at")
    return deadline is not None and time.time() > float(deadline)


def read_job(conn: Redis, job_id: str) -> JobState | None:
    job = fetch_job(conn, job_id)
    if job is None:
        return None
    meta = job.meta or {}
    state = JobState(
        id=job.id, status=public_status(job), model=meta.get("model", ""),
        params={**job.kwargs, **(meta.get("sampling") or {})},   # sampling: the values the worker used
        queued_at=job.enqueued_at, started_at=job.started_at, finished_at=job.ended_at,
        model_s=meta.get("model_s"), error=meta.get("error"),
        cancel_requested=bool(conn.exists(CANCEL_KEY.format(job.id))),
    )
    if state.status == "queued":
        state.queue_position = Queue(job.origin, connection=conn).get_job_position(job.id) or 0
    elif state.status == "running":
        state.progress = meta.get("progress")
    elif state.status == "succeeded":
        result = job.return_value() or {}
        state.images = result.get("images", [])
        state.prompt_truncated = result.get("prompt_truncated")
    elif state.status == "failed" and not state.error:
        state.error = _failure(job)
    elif state.status == "expired":
        state.error = state.error or {"code": "expired", "message": "the job waited past its deadline"}
    return state


def _failure(job: Job) -> dict:
    """The error of a job failed outside our own failure path (RQ's cleanup, a stock worker)."""
    result = job.latest_result()
    text = ((result.exc_string if result else "") or "the job failed").strip()
    if "AbandonedJobError" in text:
        return {"code": "worker_lost", "message": "its worker stopped while running it and the job was not "
                "re-queued in time (RQ's cleanup failed it)"}
    return {"code": "job_failed", "message": text.splitlines()[-1]}


def request_cancel(conn: Redis, job_id: str) -> str | None:
    """Cancel a job: queued -> 'canceled' at once; running -> 'cancel_requested' (the worker
    stops it at the next scale boundary); otherwise its public status. None if unknown."""
    job = fetch_job(conn, job_id)
    if job is None:
        return None
    conn.set(CANCEL_KEY.format(job.id), 1, ex=CANCEL_FLAG_TTL_S)
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(job.key)  # the worker's start writes this key: cancel and start exclude
                job.get_status(refresh=True)
                status = public_status(job)
                if status != "queued":
                    pipe.unwatch()
                    return "cancel_requested" if status == "running" else status
                pipe.multi()
                job.cancel(pipeline=pipe)
                pipe.hset(job.key, "ended_at", utcformat(now()))
                pipe.expire(job.key, job.result_ttl or CANCEL_FLAG_TTL_S)
                pipe.execute()
                job_ended(conn, job)
                return "canceled"
            except WatchError:
                continue


# ---------------------------------------------------------------- worker side

def job_images(job: Job) -> int:
    return int((job.meta or {}).get("images") or job.kwargs.get("n", 1))


def clear_cancel_flag(conn: Redis, job_id: str) -> None:
    conn.delete(CANCEL_KEY.format(job_id))


def return_to_queue(conn: Redis, queue: Queue, job_id: str) -> None:
    """Give a dequeued job back, at the front, as if it had never been taken."""
    with conn.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 1, job_id)
        pipe.lpush(queue.key, job_id)
        pipe.execute()


def record_finished(conn: Redis, model: str, status: str, latency_s: float | None,
                    queue_wait_s: float | None) -> None:
    """Leave one finished job's timings for the API's histograms (drained on GET /metrics). conn is
    normally the caller's pipeline (the worker ends a job in one round trip)."""
    item = json.dumps({"model": model, "status": status, "latency_s": latency_s, "queue_wait_s": queue_wait_s})
    conn.rpush(TIMINGS_KEY, item)
    conn.ltrim(TIMINGS_KEY, -TIMINGS_CAP, -1)


def drain_finished(conn: Redis, limit: int = TIMINGS_CAP) -> list[dict]:
    raw = conn.lpop(TIMINGS_KEY, limit) or []
    return [json.loads(item) for item in raw]
