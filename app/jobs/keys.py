"""Every Redis key, TTL and Lua script of the job protocol, in one place (RQ's own keys are RQ's:
its queues, job hashes, registries, executions and results, reached through RQ's calls).

Job hash fields this service adds to RQ's job record (`rq:job:<id>`), which RQ leaves alone and
which expire and vanish with the record: OWNER_FIELD, REQUEUES_FIELD, RESCUED_FIELD.
"""
from __future__ import annotations

import re

# ---------------------------------------------------------------- names
QUEUE_PREFIX = "star-"                  # one RQ queue per model: star-<model>
JOB_FUNC = "worker.tasks.run_job"       # the function name every job records (never imported: workers batch)
JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

ADMIT_KEY = "star:admit:{}"             # zset per queue: POSTs between the limit check and the push
ADMIT_HOLD_S = 30                       # a reservation left by a crashed API process lapses after this
SLOTS_KEY = "star:slots:{}"             # zset per API key name: its queued or running job ids -> reserved at
SLOT_HOLD_S = 30                        # a reservation whose job is still not enqueued after this is left over
RATE_KEY = "star:rate:{}:{}"            # counter per API key name and minute
IDEMPOTENCY_KEY = "star:idem:{}:{}"     # per API key name and sha256 of the Idempotency-Key
IDEMPOTENCY_STALE_S = 60                # a record whose job does not exist this long after the claim is left over
CANCEL_KEY = "star:cancel:{}"           # flag per job id: cancel requested
CANCEL_FLAG_TTL_S = 86400
WORKERS_SET = "star:workers"            # index of the worker registry
WORKER_KEY = "star:worker:{}"           # JSON entry per worker, TTL'd heartbeat
TIMINGS_KEY = "star:metrics:job_timings"   # list: finished jobs' timings for the API's histograms
TIMINGS_CAP = 10000
REAPER_LOCK = "star:reaper:lock"
STRANDED_KEY = "star:stranded:{}"       # hash per queue: job id -> first seen in RQ's intermediate list
STRANDED_TTL_S = 86400
ENDED_CHANNEL = "star:jobs:ended"        # pub/sub: a job id, published in the transaction that ends it
WEBHOOK_DUE_KEY = "star:webhooks:due"   # zset: event id -> when its next delivery attempt is due
WEBHOOK_EVENT_KEY = "star:webhook:{}"   # hash per event id: job, event, url, created, attempts, claim, body
WEBHOOK_CHANNEL = "star:webhooks:new"   # pub/sub: an event was recorded (wakes the deliverers)
WEBHOOK_EVENT_TTL_S = 8 * 86400         # an event record outlives any delivery bound (STAR_WEBHOOK_MAX_AGE_S <= 7 days)

OWNER_FIELD = "star_owner"              # the running attempt's token; "done:<token>" once it records
REQUEUES_FIELD = "star_requeues"        # times the job was taken from a lost worker
RESCUED_FIELD = "star_rescued_at"       # written when the reaper rescues a stranded job

# ---------------------------------------------------------------- Lua
# KEYS: queue list, admit zset. ARGV: limit, now, now - hold, job id, hold.
ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""
# KEYS: the key's slots. ARGV: limit, job id, ttl, hold, then members to give back first:
# 'e:<id>' (its job ended) or 'g:<id>' (no job record: given back only if reserved more than hold
# seconds ago, as a job not yet enqueued has no record either). Times are Redis's own clock.
RESERVE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 5, #ARGV do
  local id = string.sub(ARGV[i], 3)
  local at = redis.call('ZSCORE', KEYS[1], id)
  if at and (string.sub(ARGV[i], 1, 1) == 'e' or tonumber(at) < now - tonumber(ARGV[4])) then
    redis.call('ZREM', KEYS[1], id)
  end
end
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS: idempotency record. ARGV: job id.
FORGET_IDEMPOTENCY = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['job_id'] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: job hash. ARGV: token. The owner's right to record the outcome, taken once.
CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'star_owner')
if owner == ARGV[1] or owner == 'done:' .. ARGV[1] then
  redis.call('HSET', KEYS[1], 'star_owner', 'done:' .. ARGV[1])
  return 1
end
return 0
"""
# KEYS: job hash, cancel flag. ARGV: token, serialized meta. 2: not the owner; else the flag.
PROGRESS = """
if redis.call('HGET', KEYS[1], 'star_owner') ~= ARGV[1] then return 2 end
redis.call('HSET', KEYS[1], 'meta', ARGV[2])
return redis.call('EXISTS', KEYS[2])
"""
# KEYS: due zset. ARGV: now, lease end, limit, claim token, event key prefix. Takes the due events
# (their next attempt moves to the lease end, so a deliverer that dies leaves them due again then);
# returns [id, fields...] per live event; ids whose record expired leave the zset.
WEBHOOK_CLAIM = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))) do
  local key = ARGV[5] .. id
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    redis.call('HSET', key, 'claim', ARGV[4])
    redis.call('HINCRBY', key, 'attempts', 1)
    table.insert(out, {id, redis.call('HGETALL', key)})
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
# KEYS: due zset, event hash. ARGV: claim token, next attempt time, event id. 0: claimed by another since.
WEBHOOK_RETRY = """
if redis.call('HGET', KEYS[2], 'claim') ~= ARGV[1] then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
# KEYS: job hash. ARGV: token, '1' to count a requeue. -1: the token does not own the job (any more).
FENCE = """
if (redis.call('HGET', KEYS[1], 'star_owner') or '') ~= ARGV[1] then return -1 end
redis.call('HDEL', KEYS[1], 'star_owner')
if ARGV[2] == '1' then return redis.call('HINCRBY', KEYS[1], 'star_requeues', 1) end
return tonumber(redis.call('HGET', KEYS[1], 'star_requeues') or '0')
"""
