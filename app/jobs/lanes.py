"""Priority lanes: one RQ queue per model and lane, taken highest lane first by the model's workers.

A request's `priority` picks its lane: `high`, `normal` (the default) or `low`. The normal lane is
the model's queue `star-<model>` (its name before lanes existed); the others are
`star-<model>@high` and `star-<model>@low` (`@` never occurs in a model's queue name, so one
model's lane is never another model's queue). Every lane starts with `star-`, so the reaper, `rq
info` and RQ's registries cover them; a job keeps its lane (RQ's `origin`) when it is re-queued.

Dequeue (`pull_any`; `LaneQueue.dequeue_any` makes RQ's own work loop use it too): one Lua call
(keys.PULL) moves the first id of the highest non-empty lane to that lane's RQ intermediate list,
as RQ's dequeue of one queue does, so a pulled job is never only in a worker's memory (RQ's own
multi-queue dequeue pops without that list). When every lane is empty and the caller may wait,
it blocks on the model's wake list (keys.WAKE_KEY), which every push to a lane feeds with a token
in the push's own transaction (`wake`: submit, requeue, rescue, a job given back); it looks at
the lanes again at least every keys.WAKE_BLOCK_S, so a job pushed by anyone else (`rq requeue`)
is seen too.

Batches are not split by lane: the jobs of one model are compatible whatever their lane, and a
batch fills highest lane first, so a lower lane only takes room that higher lanes leave free.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal, get_args

from redis import Redis
from rq import Queue
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.job import Job
from rq.utils import as_text

from app.jobs import keys
from app.jobs.rq_adapter import SERIALIZER, queue_name

Lane = Literal["high", "normal", "low"]
LANES: tuple[str, ...] = get_args(Lane)   # the order workers take them in
DEFAULT_LANE = "normal"


def lane_queue_name(model: str, lane: str) -> str:
    """The queue of `model`'s lane (ValueError for an unknown lane)."""
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}; lanes: {', '.join(LANES)}")
    return lane_names(queue_name(model))[LANES.index(lane)]


def split_queue_name(name: str) -> tuple[str, str]:
    """(the model's queue name, lane) of a lane's queue name."""
    base, _, lane = name.partition(keys.LANE_SEP)
    return base, lane or DEFAULT_LANE


def lane_names(base: str) -> list[str]:
    """The lane queue names of the model whose (normal lane's) queue is `base`, highest first."""
    return [base if lane == DEFAULT_LANE else f"{base}{keys.LANE_SEP}{lane}" for lane in LANES]


def lane_queues(conn: Redis, model: str) -> list[Queue]:
    """`model`'s lane queues, highest lane first."""
    return [LaneQueue(lane_queue_name(model, lane), connection=conn, serializer=SERIALIZER) for lane in LANES]


def wake(pipe, name: str) -> None:
    """Leave a wake token for the workers of the model whose lane `name` just got a job (on the
    pipeline that pushes it)."""
    key = keys.WAKE_KEY.format(split_queue_name(name)[0])
    pipe.lpush(key, 1)
    pipe.ltrim(key, 0, keys.WAKE_CAP - 1)
    pipe.expire(key, keys.WAKE_TTL_S)


def pull_any(conn: Redis, queues: Iterable[Queue], timeout: float | None,
             job_class: type[Job] | None = None, serializer=SERIALIZER) -> tuple[Job, Queue] | None:
    """The first job of the first non-empty queue (in the order given), moved to that queue's
    intermediate list; None when all are empty and timeout is None, else waits up to timeout
    seconds and raises DequeueTimeout (as RQ's dequeue does)."""
    queues = list(queues)
    wake_keys = sorted({keys.WAKE_KEY.format(split_queue_name(q.name)[0]) for q in queues})
    script_keys = [key for q in queues for key in (q.key, q.intermediate_queue_key)] + wake_keys
    deadline = None if timeout is None else time.monotonic() + timeout
    job_class = job_class or Job
    while True:
        hit = conn.eval(keys.PULL, len(script_keys), *script_keys, len(queues))
        if hit:
            queue, job_id = queues[int(hit[0]) - 1], as_text(hit[1])
            try:
                return job_class.fetch(job_id, connection=conn, serializer=serializer), queue
            except NoSuchJobError:   # its record expired while it waited: drop the id (as RQ does)
                conn.lrem(queue.intermediate_queue_key, 1, job_id)
                continue
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left < 0.001:
            raise DequeueTimeout(timeout, [q.key for q in queues])
        conn.blpop(wake_keys, timeout=min(left, keys.WAKE_BLOCK_S))


class LaneQueue(Queue):
    """An RQ queue whose `dequeue_any` is `pull_any` (a worker built with queue_class=LaneQueue
    takes its queues in the order given, through the intermediate lists)."""

    @classmethod
    def dequeue_any(cls, queues, timeout, connection, job_class=None, serializer=None,
                    death_penalty_class=None) -> tuple[Job, Queue] | None:
        return pull_any(connection, queues, timeout, job_class=job_class, serializer=serializer or SERIALIZER)
