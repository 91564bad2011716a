"""API keys (Bearer tokens) and the per-key limits kept in Redis.

Keys come from STAR_API_KEYS (comma-separated) and/or STAR_API_KEYS_FILE (one per line, `#`
comments). An entry is either `NAME:SHA256HEX` (the key's SHA-256, so the plaintext never sits in
the deployment) or a plaintext key, hashed on load and named `key-<first 8 hex of its hash>`.
Only hashes are kept in memory; a presented token is hashed and compared with every stored hash
with `hmac.compare_digest`. No keys configured: authentication is off (every request is allowed,
and per-key limits do not apply).

Per-key limits (both 429 with Retry-After), in Redis so they hold across API replicas:
- requests per minute: a fixed one-minute window counter `star:rate:<name>:<minute>`;
- concurrent jobs: the set `star:active:<name>` of the key's queued or running job ids, reserved
  atomically (Lua) on accept and left when the job ends (app.queue.job_ended); members whose job
  has ended without telling (record expired, failed by RQ's own cleanup) are pruned when the set
  is full, so a lost release never leaks a slot for good.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from app import queue as q

log = logging.getLogger(__name__)
HASHED_ENTRY = re.compile(r"^([A-Za-z0-9._@-]{1,64}):([0-9a-fA-F]{64})$")
RATE_KEY = "star:rate:{}:{}"
ANONYMOUS = "anonymous"

# The key name of the request being served (set by the auth dependency; read where the request
# is not at hand, e.g. when the OpenAI route submits through the POST /generate endpoint).
current_key: contextvars.ContextVar[str] = contextvars.ContextVar("star_api_key", default=ANONYMOUS)

_RESERVE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_entry(entry: str) -> tuple[str, str] | None:
    """(name, sha256 hex) of one configured entry; None for blanks and comments."""
    entry = entry.strip()
    if not entry or entry.startswith("#"):
        return None
    match = HASHED_ENTRY.match(entry)
    if match:
        return match.group(1), match.group(2).lower()
    digest = hash_key(entry)
    return f"key-{digest[:8]}", digest


@dataclass
class ApiKeys:
    hashes: list[tuple[str, bytes]]   # (name, sha256 digest)

    @classmethod
    def load(cls, inline: str | None, file: Path | None) -> "ApiKeys":
        entries = (inline or "").split(",")
        if file is not None:
            entries += Path(file).read_text().splitlines()
        parsed = [p for p in map(parse_entry, entries) if p]
        return cls([(name, bytes.fromhex(digest)) for name, digest in parsed])

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def name_of(self, token: str) -> str | None:
        """The name of the key `token` is, or None; every stored hash is compared (constant time)."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for name, stored in self.hashes:
            if hmac.compare_digest(digest, stored):
                found = name
        return found


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


# ---------------------------------------------------------------- per-key limits (Redis)

def count_request(conn: Redis, name: str, limit: int, now: float | None = None) -> int | None:
    """Count one request in this minute's window; seconds to wait if over `limit`, else None."""
    now = time.time() if now is None else now
    minute = int(now // 60)
    key = RATE_KEY.format(name, minute)
    with conn.pipeline() as pipe:
        pipe.incr(key)
        pipe.expire(key, 61)
        count = pipe.execute()[0]
    if count <= limit:
        return None
    return max(1, math.ceil((minute + 1) * 60 - now))


def reserve_job(conn: Redis, name: str, job_id: str, limit: int, ttl_s: int) -> bool:
    """Take one of `name`'s `limit` job slots for job_id (atomic); False when all are held by
    jobs that are still queued or running."""
    key = q.ACTIVE_KEY.format(name)
    if conn.eval(_RESERVE, 1, key, limit, job_id, ttl_s):
        return True
    prune_ended(conn, key)
    return bool(conn.eval(_RESERVE, 1, key, limit, job_id, ttl_s))


def release_job(conn: Redis, name: str, job_id: str) -> None:
    """Give back a slot taken for a job that was not enqueued after all."""
    conn.srem(q.ACTIVE_KEY.format(name), job_id)


def prune_ended(conn: Redis, key: str) -> None:
    members = sorted(m.decode() for m in conn.smembers(key))
    ended = [job_id for job_id, status in zip(members, q.public_statuses(conn, members))
             if status not in ("queued", "running")]
    if ended:
        log.info("released %d job slot(s) of jobs that ended unseen: %s", len(ended), ", ".join(ended))
        conn.srem(key, *ended)
