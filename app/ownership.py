"""Jobs belong to the API key that created them: with keys on, another key asking for a job (GET
/jobs/{id}, its event stream, DELETE) gets exactly the 404 of an unknown id, never a 403, so it
learns nothing about whether the id exists. Admin keys (STAR_ADMIN_API_KEYS) see every job.
The rule itself is app.auth.ApiKeys.may_see; the owner is recorded on the job at submit."""
from __future__ import annotations

from app.context import Context
from app.errors import JobNotFound
from app.jobs import cancel, read


def not_found(job_id: str) -> JobNotFound:
    """The one answer for an unknown, expired or someone else's job."""
    return JobNotFound(f"no job with id {job_id} (unknown, or its record expired)")


def read_own_job(ctx: Context, caller: str, job_id: str) -> read.JobState:
    """The job if `caller` may see it, else not_found."""
    state = read.read_job(ctx.redis, job_id, allowed=lambda owner: ctx.keys.may_see(caller, owner))
    if state is None:
        raise not_found(job_id)
    return state


def cancel_own_job(ctx: Context, caller: str, job_id: str) -> str:
    """app.jobs.cancel.request_cancel's outcome for a job `caller` may see, else not_found."""
    outcome = cancel.request_cancel(ctx.redis, job_id, allowed=lambda owner: ctx.keys.may_see(caller, owner))
    if outcome is None:
        raise not_found(job_id)
    return outcome
