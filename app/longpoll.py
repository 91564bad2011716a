"""Long-poll: `GET /jobs/{id}?wait=S` answers as soon as the job ends, or after S seconds.

How a waiting request learns that its job ended without polling Redis in a loop: the transaction
that ends a job publishes its id (app.jobs.notify.announce_end); each API process holds one
subscription (app.jobs.notify.listen, started with the app) that wakes this process's waiters of
that job (`JobEnds.ended`). A waiter registers before it reads the job, so an end published between
its read and its wait still wakes it. Pub/sub keeps nothing while the subscription reconnects, and
a queued job that passes its deadline turns `expired` with no write at all, so a waiter also
re-reads its job every RECHECK_S: one Redis read per waiter every few seconds at most, never a
busy loop. The wait holds no thread (asyncio), so thousands of waiters cost one connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from app.jobs.states import ACTIVE

RECHECK_S = 2.0
State = TypeVar("State")


class JobEnds:
    """This process's long-poll waiters, by job id."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def ended(self, job_id: str) -> None:
        """A job ended (called on the event loop by the notice subscription)."""
        for event in self._waiting.get(job_id, ()):
            event.set()

    def waiters(self) -> int:
        return sum(len(events) for events in self._waiting.values())

    async def wait(self, job_id: str, seconds: float, read: Callable[[], Awaitable[State]],
                   status: Callable[[State], str | None]) -> State:
        """read() again until status(state) is final (or None: the job is gone) or `seconds` pass;
        returns the last state read."""
        deadline = time.monotonic() + seconds
        event = asyncio.Event()
        self._waiting.setdefault(job_id, set()).add(event)
        try:
            state = await read()
            while status(state) in ACTIVE:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):   # not wait_for: in 3.11 it can swallow a cancel
                    async with asyncio.timeout(min(left, RECHECK_S)):
                        await event.wait()
                event.clear()
                state = await read()
            return state
        finally:
            waiting = self._waiting.get(job_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[job_id]
