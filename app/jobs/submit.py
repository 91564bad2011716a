"""Submit and queue (API side): a request becomes one RQ job on its model's queue.

The job calls JOB_FUNC with the request parameters as kwargs (JSON serializer), so `rq info`
shows queues, jobs and workers; its meta (written here, then only by the worker that runs it)
carries `model`, `images` (n), `deadline_at` (unix time after which a still-queued job is
`expired`), with API keys on `api_key` (whose job slot it holds), and with a webhook `webhook`
({"url", "events"}: app.jobs.webhooks). The queue limit is checked
atomically with the push: a reservation in `star:admit:<queue>` covers the POSTs between the check
and the push, so that queue depth + reservations never exceed the limit however many POSTs race.
"""
from __future__ import annotations

import contextlib
import math
import time

from redis import Redis, RedisError
from rq import Queue
from rq.job import Job

from app.jobs import keys
from app.jobs.rq_adapter import get_queue, queue_length


def admit(conn: Redis, queue: Queue, job_id: str, limit: int) -> bool:
    """Reserve a place for job_id if the queue holds fewer than `limit` jobs, counting places
    reserved by concurrent POSTs (atomic: a burst of POSTs never overshoots the limit)."""
    now_s = time.time()
    return bool(conn.eval(keys.ADMIT, 2, queue.key, keys.ADMIT_KEY.format(queue.name), limit, now_s,
                          now_s - keys.ADMIT_HOLD_S, job_id, keys.ADMIT_HOLD_S))


def enqueue(conn: Redis, params: dict, model: str, *, job_id: str, deadline_s: float, result_ttl: int,
            failure_ttl: int, queue_limit: int | None = None, api_key: str | None = None,
            webhook: dict | None = None) -> tuple[Job, int] | None:
    """Put one request on its model's queue; returns the job and its queue position, or None when
    the queue already holds `queue_limit` jobs."""
    queue = get_queue(conn, model)
    if queue_limit is not None and not admit(conn, queue, job_id, queue_limit):
        return None
    meta: dict = {"model": model, "images": params["n"], "deadline_at": time.time() + deadline_s}
    if api_key:
        meta["api_key"] = api_key
    if webhook:
        meta["webhook"] = webhook
    try:
        with conn.pipeline() as pipe:
            job = queue.enqueue_call(
                keys.JOB_FUNC, kwargs=params, meta=meta, result_ttl=result_ttl, failure_ttl=failure_ttl,
                job_id=job_id,
                # The worker enforces no RQ timeout (batches run in-process); a never-started job's
                # record expires result_ttl after its deadline.
                timeout=-1, ttl=math.ceil(deadline_s) + result_ttl, pipeline=pipe,
                description=f"star {model}: {params['n']} image(s) of {params['size']}px",
            )
            pipe.zrem(keys.ADMIT_KEY.format(queue.name), job_id)
            queue_length(pipe, queue)   # in the same transaction as the push to the queue's tail
            queued = pipe.execute()[-1]
    except BaseException:
        with contextlib.suppress(RedisError):   # else it lapses after ADMIT_HOLD_S
            conn.zrem(keys.ADMIT_KEY.format(queue.name), job_id)
        raise
    # Its index at the tail right after the push (LPOS would scan the whole queue on every POST).
    return job, max(0, int(queued) - 1)
