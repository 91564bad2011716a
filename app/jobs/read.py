"""Read (API side): a job as clients see it, queue depths and waits per lane, and the finished
jobs' timings.

JobState is built from RQ's record of the job: its status (app.jobs.states), kwargs (the request),
meta (priority, progress, the sampling values it runs with, model time, error, and `api_key`: the
name of the API key that created it, its owner) and result (image ids). A queued job's position
counts the jobs ahead of it in its lane and in the model's higher lanes (workers take those first).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from app.jobs import keys
from app.jobs.lanes import DEFAULT_LANE, LANES, lane_names, lane_queues, split_queue_name
from app.jobs.rq_adapter import SERIALIZER, star_queues
from app.jobs.states import public_status


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
    usage: dict | None = None           # a succeeded job's {model_s, images, pixels} (app.jobs.usage)
    images: list[dict] | None = None
    prompt_truncated: bool | None = None
    error: dict | None = None
    owner: str | None = None   # the API key name that created it (None: created with keys off)


def fetch_job(conn: Redis, job_id: str) -> Job | None:
    """One of our jobs, or None for unknown ids and foreign RQ jobs."""
    if not keys.JOB_ID_RE.match(job_id):
        return None
    try:
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    except NoSuchJobError:
        return None
    if not (job.origin or "").startswith(keys.QUEUE_PREFIX) or job.func_name != keys.JOB_FUNC:
        return None
    return job


def job_owner(job: Job) -> str | None:
    """The name of the API key that created the job (None when keys were off)."""
    return (job.meta or {}).get("api_key")


def public_statuses(conn: Redis, job_ids: list[str]) -> list[str]:
    """Public status of each id ('gone' when its record no longer exists)."""
    jobs = Job.fetch_many(job_ids, connection=conn, serializer=SERIALIZER) if job_ids else []
    return [public_status(job) if job is not None else "gone" for job in jobs]


def read_job(conn: Redis, job_id: str, allowed: Callable[[str | None], bool] = lambda owner: True
             ) -> JobState | None:
    """The job as clients see it; None if it is unknown, or if allowed(its owner) is false (checked
    before anything else is read, so another key's job costs what an unknown one does)."""
    job = fetch_job(conn, job_id)
    if job is None or not allowed(job_owner(job)):
        return None
    meta = job.meta or {}
    state = JobState(
        id=job.id, status=public_status(job), model=meta.get("model", ""),
        params={**job.kwargs, **(meta.get("sampling") or {}),   # sampling: the values the worker used
                "priority": meta.get("priority") or DEFAULT_LANE},
        queued_at=job.enqueued_at, started_at=job.started_at, finished_at=job.ended_at,
        model_s=meta.get("model_s"), usage=meta.get("usage"), error=meta.get("error"),
        cancel_requested=bool(conn.exists(keys.CANCEL_KEY.format(job.id))), owner=job_owner(job),
    )
    if state.status == "queued":
        state.queue_position = _position(conn, job)
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


def _position(conn: Redis, job: Job) -> int:
    """Jobs ahead of a queued job: in its own lane, and every job of the model's higher lanes."""
    base, lane = split_queue_name(job.origin)
    higher = lane_names(base)[:LANES.index(lane)] if lane in LANES else []
    ahead = sum(Queue(name, connection=conn).count for name in higher)
    return ahead + (Queue(job.origin, connection=conn).get_job_position(job.id) or 0)


def queue_depth(conn: Redis, model: str) -> int:
    """Jobs waiting for `model`, all lanes together."""
    return sum(queue.count for queue in lane_queues(conn, model))


@dataclass
class LaneStats:
    depth: int                  # jobs waiting in the lane
    oldest_wait_s: float        # how long the job at its front has waited (0 when empty)


def lane_stats(conn: Redis, model: str) -> dict[str, LaneStats]:
    """Depth and wait of each lane of `model`, highest lane first."""
    out = {}
    for lane, queue in zip(LANES, lane_queues(conn, model)):
        front = queue.get_job_ids(0, 0)
        job = Job.fetch_many(front, connection=conn, serializer=SERIALIZER)[0] if front else None
        waited = time.time() - job.enqueued_at.timestamp() if job is not None and job.enqueued_at else 0.0
        out[lane] = LaneStats(queue.count, round(max(0.0, waited), 3))
    return out


def all_queue_depths(conn: Redis) -> dict[tuple[str, str], int]:
    """Depth of every lane of every model RQ knows a star queue of, by (model, lane) (model: its
    queue name without the prefix; a lane that never had a job is 0)."""
    bases = sorted({split_queue_name(q.name)[0] for q in star_queues(conn)})
    with conn.pipeline(transaction=False) as pipe:
        for base in bases:
            for name in lane_names(base):
                pipe.llen(Queue(name, connection=conn).key)
        counts = iter(pipe.execute())
    return {(base[len(keys.QUEUE_PREFIX):], lane): int(next(counts)) for base in bases for lane in LANES}


def drain_finished(conn: Redis, limit: int = keys.TIMINGS_CAP) -> list[dict]:
    """The timings finished jobs left (app.jobs.finish), each taken by one reader (GET /metrics)."""
    raw = cast(list[bytes], conn.lpop(keys.TIMINGS_KEY, limit) or [])
    return [json.loads(item) for item in raw]
