"""`GET /jobs/{job_id}/events`: one job's life as Server-Sent Events (text/event-stream).

    event: queued      data: {"id", "status": "queued", "queue_position": 2}        (when it changes)
    event: running     data: {"id", "status": "running", "progress": {"scale": 3, "scales": 10},
                              "cancel_requested": false}                             (each new scale)
    event: succeeded | failed | canceled | expired
                       data: the job, exactly as GET /jobs/{job_id} returns it; then the stream ends

Comment lines (`: ping`) keep idle connections open through proxies. The workers do not publish
progress, so the stream polls the job's Redis record (app.jobs.read.read_job, in a worker thread so
the event loop never blocks) every STAR_EVENTS_POLL_S seconds and sends only changes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from redis import RedisError
from starlette.concurrency import run_in_threadpool

from app.guards import require_key
from app.jobs.read import JobState, read_job
from app.jobs.states import FINAL
from app.ownership import read_own_job
from app.schemas import ErrorBody
from app.settings import ApiSettings
from app.views import job_view

log = logging.getLogger(__name__)


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def job_event(state: JobState, storage) -> tuple[str, dict]:
    """The event (name, data) describing a job's current state."""
    if state.status == "queued":
        return "queued", {"id": state.id, "status": "queued", "queue_position": state.queue_position}
    if state.status == "running":
        return "running", {"id": state.id, "status": "running", "progress": state.progress,
                           "cancel_requested": state.cancel_requested}
    return state.status, job_view(state, storage).model_dump(mode="json")


async def job_stream(ctx, first: JobState, settings: ApiSettings) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"   # EventSource: reconnect after 2 s if the connection drops
    state: JobState | None = first
    job_id, last, last_write = first.id, None, time.monotonic()
    while True:
        if state is not None:
            event = job_event(state, ctx.storage)
            if event != last:
                yield sse(*event)
                last, last_write = event, time.monotonic()
            if state.status in FINAL:
                return
        if time.monotonic() - last_write >= settings.events_heartbeat_s:
            yield ": ping\n\n"
            last_write = time.monotonic()
        await asyncio.sleep(settings.events_poll_s)
        try:
            state = await run_in_threadpool(read_job, ctx.redis, job_id)
        except RedisError as exc:   # keep the stream; the next poll may succeed
            log.warning("event stream of job %s: Redis unavailable: %s", job_id, exc)
            state = None
            continue
        if state is None:           # its record expired while we watched
            yield sse("not_found", {"error": {"code": "not_found", "message": f"job {job_id} is gone"}})
            return


def create_router(settings: ApiSettings) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorBody}})
    async def job_events(job_id: str, request: Request, caller: Annotated[str, Depends(require_key)]
                         ) -> StreamingResponse:
        """Server-Sent Events: `queued` (position), `running` (scale k of S), then one of
        `succeeded`, `failed`, `canceled`, `expired` with the job as GET /jobs/{id} shows it.
        404 for another API key's job, as for an unknown id."""
        ctx = request.app.state.ctx
        state = await run_in_threadpool(read_own_job, ctx, caller, job_id)
        return StreamingResponse(job_stream(ctx, state, settings), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
