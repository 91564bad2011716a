"""How the clients wait for a job (`StarClient.wait`, `AsyncStarClient.wait`):

- Without a progress callback: long-polls, `GET /jobs/{id}?wait=S` with S = LONG_POLL_S (or what
  is left of the timeout): the server answers the moment the job ends, so a job of any length
  costs one request per S seconds instead of one per poll interval.
- With a progress callback: the job's event stream, `GET /jobs/{id}/events` (Server-Sent Events),
  which sends each change of queue position and progress as the server sees it, then the final
  job, on one connection. If the stream cannot be opened or breaks off, long-polls of `poll_s`
  seconds take over (each still answered at once when the job ends), so progress keeps coming.

A server that does not hold a long-poll (an older one) answers at once: the next request then
waits `poll_s`, so no loop ever spins. A server whose STAR_LONG_POLL_MAX_S is below LONG_POLL_S
refuses the wait (422 on `wait`): the client then polls every `poll_s`.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import httpx

from client.types import TERMINAL_STATUSES, Job, Progress, StarRequestError, StarTimeout, _parse

LONG_POLL_S = 30.0   # at most the server's STAR_LONG_POLL_MAX_S (60 by default)
STREAM_SILENCE_S = 60.0   # the server pings every 15 s: this much silence means a dead stream


# ------------------------------------------------------------------------------ the event stream

def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each event of a text/event-stream, given its lines."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def apply_event(job: Job, name: str, data: dict[str, Any]) -> Job | None:
    """The job after one event (a final event carries the whole job); None for an event that
    ends the stream without the job (`not_found`)."""
    if name in TERMINAL_STATUSES:
        return Job.from_json(data)
    if name == "queued":
        return replace(job, status="queued", queue_position=data.get("queue_position"), progress=None)
    if name == "running":
        return replace(job, status="running", queue_position=None, progress=_parse(Progress, data.get("progress")),
                       cancel_requested=bool(data.get("cancel_requested")))
    return job if name == "message" else None


def _streamable(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream")


def _state(job: Job) -> tuple:
    return (job.status, job.queue_position, job.progress, job.cancel_requested)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


# ------------------------------------------------------------------------------ sync

def wait_sync(client, job_id: str, timeout: float | None, poll_s: float, on_progress) -> Job:
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: list[tuple] = []
    if on_progress is not None:
        job = _follow_sync(client, job_id, deadline, timeout, on_progress, seen)
        if job is not None:
            return job
    return _poll_sync(client, job_id, deadline, timeout, poll_s, on_progress, seen)


def _report_sync(job: Job, on_progress, seen: list[tuple]) -> None:
    if on_progress is not None and (not seen or seen[-1] != _state(job)):
        on_progress(job)
    seen[:] = [_state(job)]


def _follow_sync(client, job_id: str, deadline, timeout, on_progress, seen: list[tuple]) -> Job | None:
    """The job once ended, following its event stream; None if the stream is not usable."""
    job = client.get(job_id)
    _report_sync(job, on_progress, seen)
    if job.done:
        return job
    left = _left(deadline)
    read_s = STREAM_SILENCE_S if left is None else max(0.05, min(left, STREAM_SILENCE_S))
    url = f"/jobs/{job_id}/events"
    try:
        with client._http.stream("GET", url, headers=client._headers(url),
                                 timeout=httpx.Timeout(client.timeout, read=read_s)) as response:
            if not _streamable(response):
                return None
            for name, data in parse_events(response.iter_lines()):
                after = apply_event(job, name, data)
                if after is None:
                    return None
                job = after
                _report_sync(job, on_progress, seen)
                if job.done:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    raise StarTimeout(job, timeout or 0.0)
    except httpx.TimeoutException:
        if deadline is not None and time.monotonic() >= deadline:
            raise StarTimeout(job, timeout or 0.0) from None
    except httpx.TransportError:
        pass
    return None


def _poll_sync(client, job_id: str, deadline, timeout, poll_s: float, on_progress, seen: list[tuple]) -> Job:
    while True:
        left = _left(deadline)
        ask = client.long_poll_s if on_progress is None else poll_s
        ask = max(0.0, ask if left is None else min(ask, left))
        started = time.monotonic()
        try:
            job = client.get(job_id, wait=ask)
        except StarRequestError as exc:
            if exc.field != "wait":
                raise
            client.long_poll_s = 0.0   # this server's bound is lower: plain polls from now on
            job = client.get(job_id)
        _report_sync(job, on_progress, seen)
        if job.done:
            return job
        left = _left(deadline)
        if left is not None and left <= 0:
            raise StarTimeout(job, timeout or 0.0)
        if time.monotonic() - started < ask / 2 or not ask:   # the request was not held
            client._sleep(poll_s if left is None else min(poll_s, left))


# ------------------------------------------------------------------------------ async

async def wait_async(client, job_id: str, timeout: float | None, poll_s: float, on_progress) -> Job:
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: list[tuple] = []
    if on_progress is not None:
        job = await _follow_async(client, job_id, deadline, timeout, on_progress, seen)
        if job is not None:
            return job
    return await _poll_async(client, job_id, deadline, timeout, poll_s, on_progress, seen)


async def _report_async(job: Job, on_progress, seen: list[tuple]) -> None:
    if on_progress is not None and (not seen or seen[-1] != _state(job)):
        outcome = on_progress(job)
        if inspect.isawaitable(outcome):
            await outcome
    seen[:] = [_state(job)]


async def _follow_async(client, job_id: str, deadline, timeout, on_progress, seen: list[tuple]) -> Job | None:
    job = await client.get(job_id)
    await _report_async(job, on_progress, seen)
    if job.done:
        return job
    url = f"/jobs/{job_id}/events"
    try:
        async with asyncio.timeout(_left(deadline)):
            async with client._http.stream("GET", url, headers=client._headers(url),
                                           timeout=httpx.Timeout(client.timeout, read=STREAM_SILENCE_S)) as response:
                if not _streamable(response):
                    return None
                lines: list[str] = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line:
                        continue
                    for name, data in parse_events(lines):
                        after = apply_event(job, name, data)
                        if after is None:
                            return None
                        job = after
                        await _report_async(job, on_progress, seen)
                        if job.done:
                            return job
                    lines = []
    except TimeoutError:
        raise StarTimeout(job, timeout or 0.0) from None
    except httpx.TransportError:
        pass
    return None


async def _poll_async(client, job_id: str, deadline, timeout, poll_s: float, on_progress,
                      seen: list[tuple]) -> Job:
    while True:
        left = _left(deadline)
        ask = client.long_poll_s if on_progress is None else poll_s
        ask = max(0.0, ask if left is None else min(ask, left))
        started = time.monotonic()
        try:
            job = await client.get(job_id, wait=ask)
        except StarRequestError as exc:
            if exc.field != "wait":
                raise
            client.long_poll_s = 0.0
            job = await client.get(job_id)
        await _report_async(job, on_progress, seen)
        if job.done:
            return job
        left = _left(deadline)
        if left is not None and left <= 0:
            raise StarTimeout(job, timeout or 0.0)
        if time.monotonic() - started < ask / 2 or not ask:
            await client._sleep(poll_s if left is None else min(poll_s, left))
