"""What the API's routes share (`Context`, built once by app.main.create_app), and the live-worker
registry as POST /generate sees it (`WorkerCache`)."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from redis import Redis

from app.auth import ApiKeys
from app.jobs.workers import WorkerEntry, live_workers, served_sizes
from app.longpoll import JobEnds
from app.metrics import ApiMetrics
from app.settings import ApiSettings
from app.signing import SignedStorage, UrlSigner
from app.storage import Storage


@dataclass
class Context:
    settings: ApiSettings
    redis: Redis
    storage: Storage | SignedStorage
    metrics: ApiMetrics
    keys: ApiKeys
    workers: WorkerCache
    signer: UrlSigner | None = None
    ends: JobEnds = field(default_factory=JobEnds)   # long-poll waiters (GET /jobs/{id}?wait=S)


class WorkerCache:
    """The live-worker registry as POST /generate sees it: re-read at most every `ttl_s` seconds,
    and at once when no cached worker serves the size asked (so a request for a new worker's size
    is never refused; as the default size, the largest served, a new size counts within ttl_s).
    A worker that has just stopped may still be chosen for up to ttl_s, as it could be an instant
    after any read; its jobs wait in the queue for the model's next worker."""

    def __init__(self, conn: Redis, ttl_s: float):
        self.conn, self.ttl_s = conn, ttl_s
        self.entries: list[WorkerEntry] = []
        self.read_at = -math.inf
        self.lock = threading.Lock()

    def get(self, size: int | None) -> list[WorkerEntry]:
        with self.lock:
            entries, fresh = self.entries, time.monotonic() - self.read_at < self.ttl_s
        sizes = served_sizes(entries)
        if fresh and sizes and (size is None or size in sizes):
            return entries
        entries = live_workers(self.conn)
        with self.lock:
            self.entries, self.read_at = entries, time.monotonic()
        return entries
