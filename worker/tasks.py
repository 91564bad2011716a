"""The function every generation job names (app.queue.JOB_FUNC).

Jobs are never performed one by one: `worker.main` (a batching RQ worker holding the model) takes
them from the queue, runs compatible ones as one model call and records each job's outcome with
RQ's own lifecycle. A stock `rq worker` that picks such a job fails it with the message below.
"""
from __future__ import annotations


def run_job(**params: object) -> None:
    raise RuntimeError(
        "STAR jobs run in batches inside `star worker` (worker.main), which keeps the model loaded; "
        "do not run `rq worker` on star-* queues"
    )
