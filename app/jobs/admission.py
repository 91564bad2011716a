"""Admission of a POST before its job is queued (submit, step 1): the per-API-key request rate,
the per-key concurrent-job slots and the Idempotency-Key record. All in Redis, so the limits hold
across API replicas; the queue limit itself is checked atomically with the push (app.jobs.submit).

- Rate: a fixed one-minute window counter per key name.
- Slots: a sorted set of a key's queued or running job ids (scored by when each was reserved),
  reserved atomically on accept (Lua: check and take in one step) and left when the job ends
  (app.jobs.finish, app.jobs.release, app.jobs.cancel). When the set is full, members whose job
  ended without telling (record expired, failed by RQ's own cleanup) are given back in the same
  script that retries the reservation, so a lost release never leaks a slot for good; a member
  with no job record yet is given back only once its reservation is older than SLOT_HOLD_S (its
  POST is still between the reservation and the enqueue, or crashed there).
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
from typing import cast

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
    """Take one of `name`'s `limit` job slots for job_id; False when all are held by jobs that are
    queued, running, or reserved and not yet enqueued. Check and take are one Lua script, so a
    burst of POSTs never holds more than `limit` slots."""
    key = keys.SLOTS_KEY.format(name)
    if _reserve(conn, key, job_id, limit, ttl_s, []):
        return True
    ended = _ended(conn, key)
    return bool(ended) and _reserve(conn, key, job_id, limit, ttl_s, ended)


def release_slot(conn, name: str, job_id: str) -> None:
    """Give back a slot (a job that was not queued after all, or one that ended); conn may be a pipeline."""
    conn.zrem(keys.SLOTS_KEY.format(name), job_id)


def held_slots(conn: Redis, name: str) -> set[str]:
    """The job ids holding `name`'s slots."""
    return set(_members(conn, keys.SLOTS_KEY.format(name)))


def _reserve(conn: Redis, key: str, job_id: str, limit: int, ttl_s: int, give_back: list[str]) -> bool:
    return bool(conn.eval(keys.RESERVE_SLOT, 1, key, limit, job_id, ttl_s, keys.SLOT_HOLD_S, *give_back))


def _members(conn: Redis, key: str) -> list[str]:
    return [as_text(m) for m in cast(list[bytes], conn.zrange(key, 0, -1))]


def _ended(conn: Redis, key: str) -> list[str]:
    """Members whose job ended without telling ('e:<id>'), and members with no job record ('g:<id>':
    a record that expired, or a job not yet enqueued; the script tells them apart by age)."""
    members = sorted(_members(conn, key))
    ended = [("g:" if status == "gone" else "e:") + job_id
             for job_id, status in zip(members, public_statuses(conn, members)) if status not in ("queued", "running")]
    if ended:
        log.info("job slots of %d job(s) that ended unseen or were never enqueued may be given back: %s",
                 len(ended), ", ".join(ended))
    return ended


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
