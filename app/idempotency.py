"""`Idempotency-Key` on POST /generate: a retried POST returns the job of the first one.

Redis key `star:idem:<api key name>:<sha256 of the Idempotency-Key>` (scoped per API key, so
keys of different clients never collide) -> {"fingerprint": sha256 of the canonical request,
"job_id": ...}, written with SET NX before the job is enqueued (the job id is chosen first) and
kept STAR_RESULT_TTL_S. Same key and same body: the same job (202, same id). Same key, another
body: 409 `idempotency_conflict`. If the first request is refused (429, 503), its record is removed
so that a retry can be accepted.
"""
from __future__ import annotations

import hashlib
import json
import time

from redis import Redis
from rq.job import Job

from app.errors import IdempotencyConflict, JobConflict
from app.schemas import GenerateRequest

KEY = "star:idem:{}:{}"
MAX_KEY_CHARS = 255
STALE_S = 60   # a record whose job does not exist this long after the claim is left over

_FORGET = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['job_id'] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def fingerprint(body: GenerateRequest) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def redis_key(scope: str, key: str) -> str:
    return KEY.format(scope, hashlib.sha256(key.encode()).hexdigest())


def claim(conn: Redis, scope: str, key: str, body_hash: str, job_id: str, ttl_s: int,
          wait_s: float = 5.0) -> str | None:
    """None when the key is new (now bound to job_id: enqueue it); else the id of the job an
    earlier request with this key and body created. IdempotencyConflict for another body."""
    record_key = redis_key(scope, key)
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
            raise IdempotencyConflict("this Idempotency-Key was already used with a different request body; "
                                      "use a new key for a new request", field="Idempotency-Key")
        if conn.exists(Job.key_for(record["job_id"])):
            return record["job_id"]
        if time.time() - record.get("at", 0) > STALE_S:   # its job's record has expired: start afresh
            forget(conn, scope, key, record["job_id"])
            continue
        if time.monotonic() > deadline:
            raise JobConflict("a request with this Idempotency-Key is still being accepted; retry shortly",
                              field="Idempotency-Key")
        time.sleep(0.05)   # the first request is between its claim and its enqueue


def forget(conn: Redis, scope: str, key: str, job_id: str) -> None:
    """Remove the record if it still names job_id (the request that made it was refused)."""
    conn.eval(_FORGET, 1, redis_key(scope, key), job_id)
