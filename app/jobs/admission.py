"""Admission of a POST before its job is queued (submit, step 1): the per-API-key request rate,
the per-key concurrent-job slots and the Idempotency-Key record. All in Redis, so the limits hold
across API replicas; the queue limit itself is checked atomically with the push (app.jobs.submit).

- Rate: a fixed one-minute window counter per key name.
- Slots: the set of a key's queued or running job ids, reserved atomically on accept and left when
  the job ends (app.jobs.finish, app.jobs.release, app.jobs.read.request_cancel); members whose job
  ended without telling (record expired, failed by RQ's own cleanup) are pruned when the set is
  full, so a lost release never leaks a slot for good.
- Idempotency: `star:idem:<key name>:<sha256 of the Idempotency-Key>` -> {"fingerprint": sha256
  of the canonical request, "job_id", "at"}, written with SET NX before the job is enqueued (the
  job id is chosen first) and kept STAR_RESULT_TTL_S. Same key and body: the same job; another
  body: IdempotencyMismatch. A refused first request removes its record (`forget_idempotency`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time

from redis import Redis
from rq.job import Job
from rq.utils import as_text

from app.jobs import keys
from app.jobs.read import public_statuses

log = logging.getLogger(__name__)


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was already used with a different request body."""


class StillAccepting(Exception):
    """The first request with this Idempotency-Key has not been queued yet."""


# ---------------------------------------------------------------- rate

def count_request(conn: Redis, name: str, limit: int, now: float | None = None) -> int | None:
    """Count one request in this minute's window; seconds to wait if over `limit`, else None."""
    now = time.time() if now is None else now
    minute = int(now // 60)
    key = keys.RATE_KEY.format(name, minute)
    with conn.pipeline() as pipe:
        pipe.incr(key)
        pipe.expire(key, 61)
        count = pipe.execute()[0]
    if count <= limit:
        return None
    return max(1, math.ceil((minute + 1) * 60 - now))


# ---------------------------------------------------------------- slots

def reserve_slot(conn: Redis, name: str, job_id: str, limit: int, ttl_s: int) -> bool:
    """Take one of `name`'s `limit` job slots for job_id (atomic); False when all are held by
    jobs that are still queued or running."""
    key = keys.ACTIVE_KEY.format(name)
    if conn.eval(keys.RESERVE_SLOT, 1, key, limit, job_id, ttl_s):
        return True
    _prune_ended(conn, key)
    return bool(conn.eval(keys.RESERVE_SLOT, 1, key, limit, job_id, ttl_s))


def release_slot(conn, name: str, job_id: str) -> None:
    """Give back a slot (a job that was not queued after all, or one that ended); conn may be a pipeline."""
    conn.srem(keys.ACTIVE_KEY.format(name), job_id)


def _prune_ended(conn: Redis, key: str) -> None:
    members = sorted(as_text(m) for m in conn.smembers(key))
    ended = [job_id for job_id, status in zip(members, public_statuses(conn, members))
             if status not in ("queued", "running")]
    if ended:
        log.info("released %d job slot(s) of jobs that ended unseen: %s", len(ended), ", ".join(ended))
        conn.srem(key, *ended)


# ---------------------------------------------------------------- idempotency

def fingerprint(body: dict) -> str:
    """sha256 of a request body in canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _record_key(scope: str, key: str) -> str:
    return keys.IDEMPOTENCY_KEY.format(scope, hashlib.sha256(key.encode()).hexdigest())


def claim_idempotency(conn: Redis, scope: str, key: str, body_hash: str, job_id: str, ttl_s: int,
                      wait_s: float = 5.0) -> str | None:
    """None when the key is new (now bound to job_id: enqueue it); else the id of the job an
    earlier request with this key and body created. IdempotencyMismatch for another body,
    StillAccepting if the first request has not queued its job within wait_s."""
    record_key = _record_key(scope, key)
    value = json.dumps({"fingerprint": body_hash, "job_id": job_id, "at": time.time()})
    deadline = time.monotonic() + wait_s
    while True:
        if conn.set(record_key, value, nx=True, ex=ttl_s):
            return None
        raw = conn.get(record_key)
        if raw is None:
            continue   # released a moment ago by a refused first request
        record = json.loads(raw)
        if record["fingerprint"] != body_hash:
            raise IdempotencyMismatch(record["job_id"])
        if conn.exists(Job.key_for(record["job_id"])):
            return record["job_id"]
        if time.time() - record.get("at", 0) > keys.IDEMPOTENCY_STALE_S:   # its job's record expired: start afresh
            forget_idempotency(conn, scope, key, record["job_id"])
            continue
        if time.monotonic() > deadline:
            raise StillAccepting(record["job_id"])
        time.sleep(0.05)   # the first request is between its claim and its enqueue


def forget_idempotency(conn: Redis, scope: str, key: str, job_id: str) -> None:
    """Remove the record if it still names job_id (the request that made it was refused)."""
    conn.eval(keys.FORGET_IDEMPOTENCY, 1, _record_key(scope, key), job_id)
