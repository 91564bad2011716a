"""Run (worker side): at every scale boundary of a batch, record progress k of S on the jobs this
attempt still owns and read their cancel flags, in one round trip. A job whose token no longer
owns it was taken away (re-queued by the reaper or a drain): the worker stops computing it.
"""
from __future__ import annotations

from redis import Redis

from app.jobs import keys
from app.jobs.claim import Running
from app.jobs.rq_adapter import SERIALIZER


def scale_boundary(conn: Redis, runs: list[Running], k: int, scales: int) -> tuple[set[str], set[str]]:
    """Progress k/S on each run's job; returns (ids whose cancel flag is set, ids no longer owned)."""
    with conn.pipeline(transaction=False) as pipe:
        for run in runs:
            run.job.meta["progress"] = {"scale": k, "scales": scales}
            pipe.eval(keys.PROGRESS, 2, run.job.key, keys.CANCEL_KEY.format(run.job.id), run.token,
                      SERIALIZER.dumps(run.job.meta))
        answers = pipe.execute()
    canceled = {run.job.id for run, a in zip(runs, answers) if a == 1}
    lost = {run.job.id for run, a in zip(runs, answers) if a == 2}
    return canceled, lost
