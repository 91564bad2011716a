"""A worker's stop, bounded whatever Redis does.

The first SIGTERM/SIGINT asks for a drain: take no more jobs, finish the batch; past
STAR_DRAIN_GRACE_S the batch's jobs are put back on the queue (worker.rq_worker). From then on the
worker may still wait on Redis (to put the jobs back, to record outcomes), but not for ever:

    give up   GIVE_UP_S after the grace, or at a second signal: every Redis write still being
              retried stops (worker.resilience.retry_redis), and the jobs it was for are left for
              the reaper, which re-queues them once this worker's registry entry has expired;
    exit      EXIT_S after giving up, a process still alive (a Redis that accepts connections
              but never answers leaves threads blocked in a read) exits at once with EXIT_FORCED.

A second signal less than DUPLICATE_S after the first is the same stop (a terminal's Ctrl+C reaches
both `star serve` and its worker, which `star serve` also signals). The watchdog thread that keeps
this schedule touches nothing but this object, so nothing can hold it; it is armed for the life of
the process (worker.main.run), since the hang it guards against can come after run() returns (the
interpreter waiting for a thread stuck in a read).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
GIVE_UP_S = 10.0
EXIT_S = 5.0
DUPLICATE_S = 1.0
EXIT_FORCED = 4


class Stop:
    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], object] = os._exit):
        self.grace_s = grace_s
        self.requested_at: float | None = None   # the first signal (plain attributes: set in a handler)
        self.forced_at: float | None = None      # a second one
        self.give_up = threading.Event()         # set: stop waiting for Redis
        self.unfinished: Callable[[], list[str]] = list   # ids of the jobs not recorded yet (for the log)
        self._clock, self._exit = clock, exit
        self._disarmed = threading.Event()

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def signal(self) -> None:
        """A stop signal arrived (called from signal handlers: no locks, no I/O)."""
        now = self._clock()
        if self.requested_at is None:
            self.requested_at = now
        elif self.forced_at is None and now - self.requested_at >= DUPLICATE_S:
            self.forced_at = now

    def give_up_at(self) -> float | None:
        times = [] if self.forced_at is None else [self.forced_at]
        if self.requested_at is not None:
            times.append(self.requested_at + self.grace_s + GIVE_UP_S)
        return min(times, default=None)

    def check(self) -> None:
        """Give up on Redis, or exit, when due (the watchdog calls this every 0.1 s)."""
        at = self.give_up_at()
        if at is None or self._clock() < at:
            return
        if not self.give_up.is_set():
            log.warning("stop: %s; no more waiting for Redis", "second signal" if self.forced_at else
                        f"drain grace ({self.grace_s:g}s) + {GIVE_UP_S:g}s over")
            self.give_up.set()
        if self._clock() >= at + EXIT_S:
            left = self.unfinished()
            log.critical("stop: still running %gs after giving up on Redis; exiting now (%d); job(s) left for "
                         "the reaper: %s", EXIT_S, EXIT_FORCED, ", ".join(left) or "none")
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            self._exit(EXIT_FORCED)

    def start_watchdog(self) -> None:
        def watch() -> None:
            while not self._disarmed.wait(0.1):
                self.check()
        threading.Thread(target=watch, name="star-stop-watchdog", daemon=True).start()

    def disarm(self) -> None:
        """End the watchdog of a worker that was never asked to stop (its run ended by itself)."""
        if not self.requested:
            self._disarmed.set()
