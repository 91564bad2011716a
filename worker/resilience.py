"""Keep a worker alive through a Redis outage (restart, failover, network blip).

RQ's loop already retries its blocking dequeue with backoff, but quits on a Redis error anywhere
else (state writes, heartbeats, maintenance, suspension checks). `RedisTolerant` makes those
writes best-effort and retries the start-up registration; `retry_redis` retries the writes that
must happen (starting a job, recording its outcome) until Redis is back. Either way the worker
carries on with the same connection object: redis-py reconnects by itself.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from rq.worker import SimpleWorker

log = logging.getLogger(__name__)
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
T = TypeVar("T")


def retry_redis(action: Callable[[], T], what: str, give_up_s: float = 300.0,
                stop: Callable[[], bool] = lambda: False) -> T:
    """action() retried with backoff (0.2 s doubling to 5 s) while Redis is unreachable; the
    error is raised after give_up_s, or as soon as stop() says so (checked while waiting too)."""
    delay, deadline = 0.2, time.monotonic() + give_up_s
    while True:
        try:
            return action()
        except REDIS_DOWN as exc:
            if time.monotonic() > deadline or stop():
                raise
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
            wake = time.monotonic() + delay
            while time.monotonic() < wake and not stop():
                time.sleep(min(0.1, delay))
            if stop():
                raise
        delay = min(2 * delay, 5.0)


class RedisTolerant(SimpleWorker):
    """RQ worker whose housekeeping survives Redis being away for a while."""

    def stopping(self) -> bool:
        """Whether a stop was asked for (the start-up registration stops retrying then)."""
        return False

    def set_state(self, state: str, pipeline=None) -> None:
        if pipeline is not None:
            return super().set_state(state, pipeline=pipeline)
        try:
            super().set_state(state)   # RQ keeps the state in memory before writing it
        except REDIS_DOWN as exc:
            log.debug("worker state %s not written: %s", state, exc)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline=pipeline)
        try:
            super().heartbeat(timeout)
        except REDIS_DOWN as exc:
            log.warning("RQ heartbeat of %s not written: %s", self.name, exc)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except REDIS_DOWN as exc:
            log.warning("could not check for suspension: %s", exc)
            time.sleep(1.0)   # the dequeue that follows backs off by itself

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except REDIS_DOWN as exc:
            log.warning("RQ maintenance skipped (Redis unavailable): %s", exc)

    def bootstrap(self, *args, **kwargs) -> None:
        retry_redis(lambda: super(RedisTolerant, self).bootstrap(*args, **kwargs), "worker registration",
                    give_up_s=float("inf"), stop=self.stopping)

    def teardown(self) -> None:
        try:
            super().teardown()
        except REDIS_DOWN as exc:   # its RQ entry expires by itself
            log.warning("could not unregister worker %s: %s", self.name, exc)
