"""Cancel (API side): a queued job is canceled at once with RQ's cancel; a running one gets the flag
`star:cancel:<id>`, which its worker reads at the next scale boundary (app.jobs.progress) and then
ends the job as canceled (app.jobs.finish). The flag is set first, so a job that starts meanwhile
still sees it.
"""
from __future__ import annotations

from collections.abc import Callable

from redis import Redis, WatchError
from rq.utils import now

from app.jobs import keys, notify, webhooks
from app.jobs.admission import release_slot
from app.jobs.read import fetch_job, job_owner
from app.jobs.states import public_status


def request_cancel(conn: Redis, job_id: str, allowed: Callable[[str | None], bool] = lambda owner: True
                   ) -> str | None:
    """queued -> 'canceled' at once; running -> 'cancel_requested'; otherwise the job's public
    status. None if the job is unknown, or if allowed(its owner) is false (a job of another API
    key: the same answer as an unknown id)."""
    job = fetch_job(conn, job_id)
    if job is None or not allowed(job_owner(job)):
        return None
    conn.set(keys.CANCEL_KEY.format(job.id), 1, ex=keys.CANCEL_FLAG_TTL_S)
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
                job.ended_at = now()
                job.save(pipeline=pipe, include_meta=False)
                job.cleanup(job.result_ttl or keys.CANCEL_FLAG_TTL_S, pipeline=pipe, remove_from_queue=False)
                owner = job_owner(job)
                if owner:
                    release_slot(pipe, owner, job.id)
                webhooks.record(pipe, job, "canceled")
                notify.announce_end(pipe, job.id)
                pipe.execute()
                return "canceled"
            except WatchError:
                continue
