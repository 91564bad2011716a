"""Usage accounting: what each succeeded job used, and every API key's totals, in Redis.

A succeeded job's usage (computed by its worker, worker.publish.job_usage): `model_s`, its share
of the wall time of the model call it ran in, split by images (call time x its images / the
call's images); `images`; `pixels` (width x height, summed over its images). It is recorded once,
in the transaction that records the success (app.jobs.finish.succeeded, after the owner's claim):
on the job (meta `usage`, shown by GET /jobs/{id}) and added to its API key's totals:

    star:usage:total:<key>        hash: jobs, images, pixels, model_s (since the key's first job)
    star:usage:day:<key>:<day>    hash: the same for one UTC day (YYYY-MM-DD), kept USAGE_DAY_TTL_S
    star:usage:keys               set: the key names that have usage

Jobs queued without API keys (authentication off) count under `anonymous`. Canceled, failed and
expired jobs are not charged (nor are rows of a batch canceled mid-call: the call's time is split
by the images it started with).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis import Redis
from rq.job import Job
from rq.utils import as_text

from app.jobs import keys

ANONYMOUS = "anonymous"             # = app.auth.ANONYMOUS: jobs of a server without API keys
FIELDS = ("jobs", "images", "pixels", "model_s")


@dataclass
class Totals:
    jobs: int = 0
    images: int = 0
    pixels: int = 0
    model_s: float = 0.0

    @classmethod
    def from_hash(cls, raw: dict) -> "Totals":
        values = {as_text(k): as_text(v) for k, v in raw.items()}
        return cls(int(values.get("jobs", 0)), int(values.get("images", 0)), int(values.get("pixels", 0)),
                   round(float(values.get("model_s", 0.0)), 4))


@dataclass
class KeyUsage:
    key: str
    totals: Totals
    days: dict[str, Totals] = field(default_factory=dict)   # UTC day -> that day's usage, oldest first


def key_of(job: Job) -> str:
    """The API key a job counts under."""
    return (job.meta or {}).get("api_key") or ANONYMOUS


def day_of(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(unix_s))


def record(pipe, job: Job, usage: dict, at: float | None = None) -> None:
    """Add a succeeded job's usage to its key's totals, on the pipeline that records the success;
    once per job (keys.USAGE_RECORD: a retry of the same recording adds nothing)."""
    name = key_of(job)
    day_key = keys.USAGE_DAY_KEY.format(name, day_of(time.time() if at is None else at))
    pipe.eval(keys.USAGE_RECORD, 4, job.key, keys.USAGE_KEY.format(name), day_key, keys.USAGE_KEYS,
              int(usage["images"]), int(usage["pixels"]), float(usage["model_s"]), keys.USAGE_DAY_TTL_S, name)


def read_keys(conn: Redis, names: list[str], days: int, now: float | None = None) -> list[KeyUsage]:
    """Each key's totals and its usage on each of the last `days` UTC days that had any."""
    now = time.time() if now is None else now
    dates = [day_of(now - i * 86400) for i in reversed(range(days))]
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.USAGE_KEY.format(name))
            for date in dates:
                pipe.hgetall(keys.USAGE_DAY_KEY.format(name, date))
        raw = iter(pipe.execute())
    out = []
    for name in names:
        usage = KeyUsage(name, Totals.from_hash(next(raw)))
        for date in dates:
            day = next(raw)
            if day:
                usage.days[date] = Totals.from_hash(day)
        out.append(usage)
    return out


def known_keys(conn: Redis) -> list[str]:
    """Every key name that has usage, sorted."""
    return sorted(as_text(name) for name in conn.smembers(keys.USAGE_KEYS))
