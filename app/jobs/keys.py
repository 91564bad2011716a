"""Every Redis key, TTL and Lua script of the job protocol, in one place (RQ's own keys are RQ's:
its queues, job hashes, registries, executions and results, reached through RQ's calls).

Job hash fields this service adds to RQ's job record (`rq:job:<id>`), which RQ leaves alone and
which expire and vanish with the record: OWNER_FIELD, REQUEUES_FIELD, RESCUED_FIELD, USAGE_FIELD.
"""
from __future__ import annotations

import re

# ---------------------------------------------------------------- names
QUEUE_PREFIX = "star-"                  # one RQ queue per model and lane: star-<model>[@high|@low] (lanes.py)
LANE_SEP = "@"                          # never in a model's queue name (rq_adapter.queue_name)
JOB_FUNC = "worker.tasks.run_job"       # the function name every job records (never imported: workers batch)
JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

ADMIT_KEY = "star:admit:{}"             # zset per model (its normal lane's queue name): POSTs between the limit check and the push
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
USAGE_KEY = "star:usage:total:{}"       # hash per API key name: jobs, images, pixels, model_s (usage.py)
USAGE_DAY_KEY = "star:usage:day:{}:{}"  # the same per key name and UTC day (YYYY-MM-DD)
USAGE_DAY_TTL_S = 400 * 86400           # a day's usage is kept this long (GET /usage?days= goes back 366)
USAGE_KEYS = "star:usage:keys"          # set: key names that have usage
WAKE_KEY = "star:wake:{}"               # list per model (its normal lane's queue name): one token per push to a lane
WAKE_CAP = 64                           # tokens kept (a blocked worker needs one; more are stale)
WAKE_TTL_S = 86400
WAKE_BLOCK_S = 2.0                      # an idle worker looks at its lanes at least this often
WEBHOOK_EVENT_TTL_S = 8 * 86400         # an event record outlives any delivery bound (STAR_WEBHOOK_MAX_AGE_S <= 7 days)

OWNER_FIELD = "star_owner"              # the running attempt's token; "done:<token>" once it records
REQUEUES_FIELD = "star_requeues"        # times the job was taken from a lost worker
RESCUED_FIELD = "star_rescued_at"       # written when the reaper rescues a stranded job
USAGE_FIELD = "star_usage_counted"      # set once the job's usage is in its key's totals (never twice)

# ---------------------------------------------------------------- Lua
# KEYS: admit zset, then every lane's queue list of the model. ARGV: limit, now, now - hold, job id, hold.
ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local held = redis.call('ZCARD', KEYS[1])
for i = 2, #KEYS do held = held + redis.call('LLEN', KEYS[i]) end
if held >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
# KEYS: lane queue, its RQ intermediate list (per lane, highest first), then the wake lists.
# ARGV: the number of lanes. The first id of the highest non-empty lane moves to that lane's
# intermediate list (as RQ's own dequeue does): returns {lane index (1-based), id}. All lanes
# empty: the wake tokens are stale (every push they announce was taken), so they go.
PULL = """
local lanes = tonumber(ARGV[1])
for i = 1, lanes do
  local id = redis.call('LMOVE', KEYS[2 * i - 1], KEYS[2 * i], 'LEFT', 'RIGHT')
  if id then return {i, id} end
end
for i = 2 * lanes + 1, #KEYS do redis.call('DEL', KEYS[i]) end
return false
"""
# KEYS: job hash, the key's totals, the key's day, the set of keys with usage. ARGV: images,
# pixels, model_s, day TTL, key name. Adds a succeeded job's usage once (a retried recording of
# the same outcome finds USAGE_FIELD set): 1 if added.
USAGE_RECORD = """
if redis.call('HSETNX', KEYS[1], 'star_usage_counted', '1') == 0 then return 0 end
for i = 2, 3 do
  redis.call('HINCRBY', KEYS[i], 'jobs', 1)
  redis.call('HINCRBY', KEYS[i], 'images', ARGV[1])
  redis.call('HINCRBY', KEYS[i], 'pixels', ARGV[2])
  redis.call('HINCRBYFLOAT', KEYS[i], 'model_s', ARGV[3])
end
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[5])
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
