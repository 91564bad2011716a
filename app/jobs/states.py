"""The public states of a job, the one list of them, and how RQ's statuses map onto them.

    queued -> running -> succeeded | failed | canceled
    queued -> expired | canceled                         (never started)
    running -> queued                                    (its worker was lost, or drained past its grace)
"""
from __future__ import annotations

import time
from typing import Literal, get_args

from rq.job import Job, JobStatus as RQStatus

ActiveStatus = Literal["queued", "running"]
FinalStatus = Literal["succeeded", "failed", "canceled", "expired"]
JobStatus = Literal[ActiveStatus, FinalStatus]
ACTIVE: tuple[str, ...] = get_args(ActiveStatus)
FINAL: tuple[str, ...] = get_args(FinalStatus)

WAITING = (RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED, RQStatus.CREATED)


def public_status(job: Job) -> str:
    """The job's state as clients see it, from its RQ status (as last read) and meta."""
    status = job.get_status(refresh=False)
    if status in WAITING:
        return "expired" if is_expired(job) else "queued"
    if status == RQStatus.STARTED:
        return "running"
    if status == RQStatus.FINISHED:
        return "succeeded"
    if status in (RQStatus.CANCELED, RQStatus.STOPPED):
        return "canceled"
    if status == RQStatus.FAILED and ((job.meta or {}).get("error") or {}).get("code") == "expired":
        return "expired"
    return "failed"


def is_expired(job: Job) -> bool:
    """Past its deadline (meaningful while the job waits: a started job is never expired)."""
    deadline = (job.meta or {}).get("deadline_at")
    return deadline is not None and time.time() > float(deadline)
