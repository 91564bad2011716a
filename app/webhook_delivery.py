"""Webhook delivery: every API process runs one `Deliverer` (a task of its event loop, started with
the app) that takes due events from the outbox in Redis (app.jobs.webhooks) and POSTs them;
`document_webhooks` puts the delivery (body app.schemas.WebhookEvent, headers) in the OpenAPI schema.

Why here: the event's body is the job exactly as GET /jobs/{id} returns it, image URLs signed
with the API's key included, and only the API has what builds it; the API already waits on
network peers without blocking (asyncio), while the worker must never wait on a receiver (it
only records the event). Every API replica delivers; the claim lease shares the work.

A delivery: `POST <webhook_url>` with the JSON body
    {"event_id": "evt_...", "event": "succeeded", "created_at": "...", "job": {GET /jobs/{id}}}
and the headers
    Star-Event-Id: evt_...        the same on every retry of the event (drop duplicates with it)
    Star-Event: succeeded         running, succeeded, failed, canceled or expired
    Star-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with STAR_WEBHOOK_SECRET>
A 2xx answer delivers it. Anything else (another status, a timeout, a refused connection; no
redirect is followed) is retried after STAR_WEBHOOK_BACKOFF_S, doubling each time up to
STAR_WEBHOOK_MAX_BACKOFF_S, as long as the next attempt falls within STAR_WEBHOOK_MAX_AGE_S of
the event; then it is given up. A target that resolves to a refused address at delivery time is
given up at once. Outcomes are counted in star_webhook_deliveries_total{outcome}.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from datetime import datetime, timezone
from typing import Annotated

import httpx
from fastapi import FastAPI, Header
from redis import RedisError
from starlette.concurrency import run_in_threadpool

from app.jobs import webhooks as outbox
from app.jobs.read import read_job
from app.schemas import WebhookEvent
from app.views import job_view
from app.webhook_targets import TargetRefused, TargetUnresolved, resolve_target

log = logging.getLogger(__name__)
POLL_S = 0.5   # due events (retries) are looked for at least this often; new ones wake the loop at once


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The Star-Signature header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def next_delay(settings, attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones."""
    return min(settings.webhook_max_backoff_s, settings.webhook_backoff_s * 2 ** max(0, attempts - 1))


class Deliverer:
    def __init__(self, ctx):
        self.ctx, self.settings = ctx, ctx.settings
        self.secret = ctx.settings.webhook_secret.get_secret_value()
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        # a claim outlives an attempt (bounded by STAR_WEBHOOK_TIMEOUT_S) and the recording of its
        # outcome; were it ever shorter, the cost is a duplicate delivery, never a lost one
        self.lease_s = self.settings.webhook_timeout_s + 5

    async def run(self) -> None:
        """Forever: claim what is due (up to the free delivery slots) and deliver it."""
        limit = self.settings.webhook_concurrency
        async with httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": "star-webhooks/0.1"}) as http:
            try:
                while True:
                    self.wake.clear()
                    try:
                        await self._claim_and_start(http, limit - len(self.tasks))
                    except Exception:   # a bug: logged, and the loop goes on
                        log.exception("webhooks: the delivery loop failed; trying again")
                    with contextlib.suppress(TimeoutError):   # not wait_for: in 3.11 it can swallow a cancel
                        async with asyncio.timeout(POLL_S):
                            await self.wake.wait()
            finally:
                for task in self.tasks:
                    task.cancel()

    async def _claim_and_start(self, http: httpx.AsyncClient, free: int) -> None:
        for event in await self._claim(free) if free > 0 else []:
            task = asyncio.create_task(self._deliver(http, event))
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.wake.set()

    async def _claim(self, limit: int) -> list[outbox.Event]:
        try:
            return await run_in_threadpool(outbox.claim, self.ctx.redis, limit, self.lease_s)
        except RedisError as exc:
            log.warning("webhooks: cannot claim due events (Redis: %s)", exc)
            return []

    async def _deliver(self, http: httpx.AsyncClient, event: outbox.Event) -> None:
        try:
            try:
                async with asyncio.timeout(self.settings.webhook_timeout_s):   # DNS and body included
                    outcome = await self._attempt(http, event)
            except TimeoutError:
                outcome = "failed"
            if outcome == "failed" and time.time() + next_delay(self.settings, event.attempts) > \
                    event.created + self.settings.webhook_max_age_s:
                outcome = "gave_up"
            if outcome == "failed":
                await run_in_threadpool(outbox.retry_at, self.ctx.redis, event,
                                        time.time() + next_delay(self.settings, event.attempts))
            else:
                await run_in_threadpool(outbox.remove, self.ctx.redis, event.id)
        except RedisError as exc:   # the claim lapses and the event is tried again
            log.warning("webhooks: event %s: Redis unavailable (%s); it is retried after its lease", event.id, exc)
            return
        except Exception:
            log.exception("webhooks: event %s: delivery failed unexpectedly; it is retried after its lease", event.id)
            return
        self.ctx.metrics.webhook_deliveries.labels(outcome).inc()
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(level, "webhook %s (%s of job %s) to %s: attempt %d %s", event.id, event.event, event.job_id,
                event.url, event.attempts, outcome)

    async def _attempt(self, http: httpx.AsyncClient, event: outbox.Event) -> str:
        """One delivery attempt: delivered, failed (retry), refused or gone (never retried)."""
        body = event.body or await run_in_threadpool(self._first_body, event)
        if body is None:
            return "gone"
        try:
            target = await run_in_threadpool(resolve_target, event.url, self.settings.webhook_allow_private)
        except TargetRefused as exc:
            log.warning("webhook %s: target refused at delivery: %s", event.id, exc)
            return "refused"
        except TargetUnresolved as exc:
            log.warning("webhook %s: %s", event.id, exc)
            return "failed"
        headers = {**target.headers, "Content-Type": "application/json", "Star-Event-Id": event.id,
                   "Star-Event": event.event, "Star-Signature": signature(self.secret, int(time.time()), body)}
        try:
            response = await http.post(target.url, content=body, headers=headers, extensions=target.extensions,
                                       timeout=self.settings.webhook_timeout_s)
        except httpx.HTTPError as exc:
            log.info("webhook %s: %s: %s", event.id, type(exc).__name__, exc)
            return "failed"
        return "delivered" if response.is_success else "failed"

    def _first_body(self, event: outbox.Event) -> bytes | None:
        """The event's body, built from the job as it is now and stored for every retry; None if
        the job's record is gone."""
        state = read_job(self.ctx.redis, event.job_id)
        if state is None:
            return None
        body = WebhookEvent(event_id=event.id, event=event.event,
                            created_at=datetime.fromtimestamp(event.created, timezone.utc),
                            job=job_view(state, self.ctx.storage))
        return outbox.store_body(self.ctx.redis, event.id, body.model_dump_json().encode())


def document_webhooks(app: FastAPI) -> None:
    """Describe the delivery in the app's OpenAPI schema (its `webhooks` section)."""

    @app.webhooks.post("job-event", tags=["webhooks"], status_code=204)
    def job_event(body: WebhookEvent,
                  star_event_id: Annotated[str, Header(description="The body's `event_id`.")],
                  star_event: Annotated[str, Header(description="The body's `event`.")],
                  star_signature: Annotated[str, Header(description=(
                      't=<unix seconds>,v1=<hex HMAC-SHA256 keyed with STAR_WEBHOOK_SECRET of "<t>.<raw body>">; '
                      "refuse a stale t"))]) -> None:
        """POSTed to a job's `webhook_url` when the job ends (and when it starts, with
        `webhook_events: ["running", "final"]`). Any 2xx answer within STAR_WEBHOOK_TIMEOUT_S
        delivers it; anything else is retried with backoff for STAR_WEBHOOK_MAX_AGE_S. At least
        once: drop an `event_id` already handled."""
