"""Submit and queue (API side): a request becomes one RQ job on its model's queue of its lane
(app.jobs.lanes: `star-<model>` for normal, `star-<model>@high`, `star-<model>@low`).

The job calls JOB_FUNC with the request parameters as kwargs (JSON serializer), so `rq info`
shows queues, jobs and workers; its meta (written here, then only by the worker that runs it)
carries `model`, `images` (n), `deadline_at` (unix time after which a still-queued job is
`expired`), `priority` (its lane), with API keys on `api_key` (whose job slot it holds), and with a
webhook `webhook` ({"url", "events"}: app.jobs.webhooks). The queue limit counts every lane of the
model and is checked atomically with the push: a reservation in `star:admit:<model's queue>`
covers the POSTs between the check and the push, so that the lanes' depths + reservations never
exceed the limit however many POSTs race. The push leaves a wake token for idle workers.
"""
from __future__ import annotations

import contextlib
import math
import time

from redis import Redis, RedisError
from rq import Queue
from rq.job import Job

from app.jobs import keys
from app.jobs.lanes import DEFAULT_LANE, LANES, lane_queues, wake
from app.jobs.rq_adapter import queue_length, queue_name


def admit(conn: Redis, lanes: list[Queue], job_id: str, limit: int) -> bool:
    """Reserve a place for job_id if the model's lanes hold fewer than `limit` jobs together,
    counting places reserved by concurrent POSTs (atomic: a burst never overshoots the limit)."""
    now_s = time.time()
    admit_key = keys.ADMIT_KEY.format(lanes[LANES.index(DEFAULT_LANE)].name)
    return bool(conn.eval(keys.ADMIT, 1 + len(lanes), admit_key, *(q.key for q in lanes), limit, now_s,
                          now_s - keys.ADMIT_HOLD_S, job_id, keys.ADMIT_HOLD_S))


def enqueue(conn: Redis, params: dict, model: str, *, job_id: str, deadline_s: float, result_ttl: int,
            failure_ttl: int, queue_limit: int | None = None, api_key: str | None = None,
            webhook: dict | None = None, priority: str = DEFAULT_LANE) -> tuple[Job, int] | None:
    """Put one request on its model's queue of lane `priority`; returns the job and its queue
    position (jobs of its own and higher lanes ahead of it), or None when the model's lanes
    already hold `queue_limit` jobs."""
    lanes = lane_queues(conn, model)
    queue = lanes[LANES.index(priority)]
    if queue_limit is not None and not admit(conn, lanes, job_id, queue_limit):
        return None
    meta: dict = {"model": model, "images": params["n"], "deadline_at": time.time() + deadline_s,
                  "priority": priority}
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
            pipe.zrem(keys.ADMIT_KEY.format(queue_name(model)), job_id)
            wake(pipe, queue.name)
            ahead = lanes[:LANES.index(priority) + 1]
            for lane in ahead:
                queue_length(pipe, lane)   # in the same transaction as the push to the queue's tail
            queued = sum(int(n) for n in pipe.execute()[-len(ahead):])
    except BaseException:
        with contextlib.suppress(RedisError):   # else it lapses after ADMIT_HOLD_S
            conn.zrem(keys.ADMIT_KEY.format(queue_name(model)), job_id)
        raise
    # Its index at the tail right after the push (LPOS would scan the whole queue on every POST).
    return job, max(0, queued - 1)
