"""Worker health: a state (starting, ready, busy, draining, failed) published in the Redis worker
registry (app.jobs.workers) and in the worker's metrics, by a heartbeat thread that also keeps RQ's
heartbeats of in-flight jobs alive while the main thread is inside a long model call, runs the
reaper of dead workers' jobs (hooks), and watches the drain grace period after SIGTERM (the stop
itself, bounded whatever Redis does, is worker.stopping's).

The registry entry lives `deadline_s` (STAR_WORKER_DEADLINE_S) after each beat: a worker silent
that long is presumed dead and its running jobs are re-queued (app.jobs.reaper).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from redis import Redis

from app.jobs.workers import WorkerEntry, publish_worker, remove_worker
from worker.metrics import WorkerMetrics
from worker.stopping import Stop

log = logging.getLogger(__name__)


class Health:
    """Owns the worker's registry entry; `beat()` runs every `period_s` on its own thread."""

    def __init__(self, conn: Redis, entry: WorkerEntry, period_s: float, metrics: WorkerMetrics,
                 deadline_s: float | None = None, grace_s: float = float("inf")):
        self.conn = conn
        self.entry = entry
        self.period_s = period_s
        self.deadline_s = deadline_s or max(3 * period_s, 2.0)
        self.shutdown = Stop(grace_s)   # shutdown.signal() from the signal handlers
        self._grace_over = False
        self.metrics = metrics
        self.hooks: list[Callable[[], None]] = []         # every beat
        self.grace_hooks: list[Callable[[], None]] = []   # once, when the drain grace is over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="star-heartbeat", daemon=True)

    @property
    def state(self) -> str:
        return self.entry.state

    @property
    def drain_requested(self) -> bool:
        return self.shutdown.requested

    def set_state(self, state: str) -> None:
        if self.drain_requested and state in ("ready", "busy"):
            state = "draining"
        if state != self.entry.state:
            log.info("worker %s: %s -> %s", self.entry.name, self.entry.state, state)
        self.entry.state = state
        self.metrics.state.state(state)
        self.publish()

    def publish(self) -> None:
        try:
            publish_worker(self.conn, self.entry, ttl_s=self.deadline_s)
        except Exception as exc:  # Redis hiccup: the next beat retries
            log.warning("worker %s: could not publish its heartbeat: %s", self.entry.name, exc)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            remove_worker(self.conn, self.entry.name)
        except Exception as exc:   # it expires after three heartbeat periods anyway
            log.warning("worker %s: could not remove its registry entry: %s", self.entry.name, exc)

    def beat(self) -> None:
        self.publish()
        for hook in self.hooks:
            try:
                hook()
            except Exception as exc:
                log.warning("worker %s: heartbeat of running jobs failed: %s", self.entry.name, exc)

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(0.1):
            if self.drain_requested:
                self._watch_drain()
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + self.period_s

    def _watch_drain(self) -> None:
        if self.entry.state not in ("draining", "failed"):
            self.set_state("draining")
        since = self.shutdown.requested_at
        if not self._grace_over and since is not None and time.monotonic() - since > self.shutdown.grace_s:
            self._grace_over = True   # once
            for hook in self.grace_hooks:
                try:
                    hook()
                except Exception:
                    log.exception("worker %s: drain grace hook failed", self.entry.name)
