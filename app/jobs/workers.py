"""The worker registry: `star:worker:<name>` (a JSON entry whose TTL is the worker's heartbeat
deadline) indexed by the set `star:workers`. Workers publish their entry (state, model, size,
sampling defaults, example prompts, whether the model has a sampler head) on every heartbeat and
state change; the API reads it to choose a model for a request, for /readyz, /models and /metrics;
the reaper reads it to tell live workers from lost ones.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

from redis import Redis

from app.jobs.keys import WORKER_KEY, WORKERS_SET

ACCEPTING_STATES = ("starting", "ready", "busy")   # a POST may be queued for these workers
READY_STATES = ("ready", "busy")                    # /readyz needs one of these


@dataclass
class WorkerEntry:
    name: str
    model: str
    state: str                      # starting, ready, busy, draining, failed
    size: int | None = None         # known once the model is loaded
    queue: str | None = None
    max_batch: int = 1
    max_wait_ms: int = 0
    device: str = ""
    host: str = ""
    pid: int = 0
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = 0.0
    sampling: dict | None = None    # the model's sampling defaults (API names), known once loaded
    scales: int | None = None       # scales of the model's schedule, known once loaded
    guidance_stop_scale: int | None = None   # the worker's default first scale without guidance (None: none)
    example_prompts: list[str] = field(default_factory=list)   # from the model's config.json, once loaded
    sampler_head: bool | None = None    # the model has a sampler head (sampler "head"), known once loaded


_ENTRY_FIELDS = {f.name for f in fields(WorkerEntry)}


def publish_worker(conn: Redis, entry: WorkerEntry, ttl_s: float) -> None:
    entry.heartbeat_at = time.time()
    with conn.pipeline() as pipe:
        pipe.set(WORKER_KEY.format(entry.name), json.dumps(asdict(entry)), ex=max(1, math.ceil(ttl_s)))
        pipe.sadd(WORKERS_SET, entry.name)
        pipe.execute()


def remove_worker(conn: Redis, name: str) -> None:
    with conn.pipeline() as pipe:
        pipe.delete(WORKER_KEY.format(name))
        pipe.srem(WORKERS_SET, name)
        pipe.execute()


def worker_alive(conn: Redis, name: str) -> bool:
    return bool(conn.exists(WORKER_KEY.format(name)))


def live_workers(conn: Redis) -> list[WorkerEntry]:
    """Workers whose heartbeat key has not expired (stale index members are pruned)."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in conn.smembers(WORKERS_SET))
    if not names:
        return []
    values = conn.mget([WORKER_KEY.format(name) for name in names])
    entries, stale = [], []
    for name, raw in zip(names, values):
        if raw is None:
            stale.append(name)
        else:
            data = json.loads(raw)   # fields of newer workers that this code does not know are ignored
            entries.append(WorkerEntry(**{k: v for k, v in data.items() if k in _ENTRY_FIELDS}))
    if stale:
        conn.srem(WORKERS_SET, *stale)
    return entries


def served_sizes(entries: Iterable[WorkerEntry], sampler_head: bool = False) -> list[int]:
    """Sizes that accepting workers serve (with sampler_head: only by models with a sampler head)."""
    return sorted({e.size for e in entries if e.size and e.state in ACCEPTING_STATES
                   and (e.sampler_head or not sampler_head)})


def model_for_size(entries: Iterable[WorkerEntry], size: int, sampler_head: bool = False) -> str | None:
    """The model serving `size` with the most ready workers (ties: by name), or None; with
    sampler_head, only models whose workers report a sampler head count."""
    score: dict[str, int] = {}
    for e in entries:
        if e.size == size and e.state in ACCEPTING_STATES and (e.sampler_head or not sampler_head):
            score[e.model] = score.get(e.model, 0) + (e.state in READY_STATES)
    return min(score, key=lambda m: (-score[m], m)) if score else None
