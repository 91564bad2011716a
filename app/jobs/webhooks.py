"""Webhook events, kept in Redis until delivered (an outbox): what a job's start or end leaves for the
deliverers, and how a deliverer claims, reschedules and removes them.

A job submitted with a webhook carries meta `webhook` = {"url", "events"} (events: "final", and
"running" when asked). `record(pipe, job, event)` runs on the pipeline of the very transaction that
starts the job (app.jobs.claim) or ends it (app.jobs.finish, release, cancel), so the event exists
exactly when the transition does: a process that dies right after leaves it for delivery. The
worker only writes these keys; it never talks to a receiver (the GPU never waits on one).

    star:webhook:<event id>  hash: job, event, url, created, attempts, claim, body
    star:webhooks:due        zset: event id -> when its next attempt is due
    star:webhooks:new        channel: an event was recorded (wakes the deliverers at once)

Delivery (app.webhook_delivery, in every API process): `claim` takes due events and moves each
one's due time to the end of a lease, under a fresh claim token; a deliverer that dies mid-attempt
leaves the event due again when the lease ends, for any deliverer (at least once). `body` is fixed
by the first attempt (`store_body`), so every retry sends the same bytes under the same event id.
`remove` ends an event (delivered or given up); `retry_at` reschedules it unless another deliverer
has claimed it since.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from redis import Redis
from rq.job import Job
from rq.utils import as_text

from app.jobs import keys

FINAL_GROUP = "final"        # the events a job's end sends: succeeded, failed, canceled, expired
RUNNING = "running"          # sent each time a worker starts the job (again after a re-queue)
EVENT_GROUPS = (RUNNING, FINAL_GROUP)


@dataclass(frozen=True)
class Event:
    id: str
    job_id: str
    event: str            # running, succeeded, failed, canceled, expired
    url: str
    created: float        # unix time the event was recorded
    attempts: int         # delivery attempts started, this one included
    claim: str            # the token of the claim that returned it
    body: bytes | None    # fixed by the first attempt


def record(pipe, job: Job, event: str) -> str | None:
    """Leave `event` of `job` for delivery if its webhook asked for it (on the transition's
    pipeline); returns the event id, or None when there is nothing to send."""
    hook = (job.meta or {}).get("webhook")
    if not hook or (RUNNING if event == RUNNING else FINAL_GROUP) not in hook.get("events", (FINAL_GROUP,)):
        return None
    event_id = "evt_" + uuid.uuid4().hex
    now = time.time()
    key = keys.WEBHOOK_EVENT_KEY.format(event_id)
    pipe.hset(key, mapping={"job": job.id, "event": event, "url": hook["url"], "created": repr(now),
                            "attempts": 0})
    pipe.expire(key, keys.WEBHOOK_EVENT_TTL_S)
    pipe.zadd(keys.WEBHOOK_DUE_KEY, {event_id: now})
    pipe.publish(keys.WEBHOOK_CHANNEL, event_id)
    return event_id


def claim(conn: Redis, limit: int, lease_s: float, now: float | None = None) -> list[Event]:
    """Up to `limit` due events, each now held by this caller until `lease_s` from now."""
    now = time.time() if now is None else now
    token = uuid.uuid4().hex
    rows = conn.eval(keys.WEBHOOK_CLAIM, 1, keys.WEBHOOK_DUE_KEY, repr(now), repr(now + lease_s), limit, token,
                     keys.WEBHOOK_EVENT_KEY.format(""))
    events = []
    for raw_id, flat in rows:
        fields = {as_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        events.append(Event(as_text(raw_id), as_text(fields["job"]), as_text(fields["event"]), as_text(fields["url"]),
                            float(fields["created"]), int(fields["attempts"]), token, fields.get("body")))
    return events


def store_body(conn: Redis, event_id: str, body: bytes) -> bytes:
    """The event's body: `body` if this is the first to store one, else the one stored before."""
    key = keys.WEBHOOK_EVENT_KEY.format(event_id)
    if conn.hsetnx(key, "body", body):
        return body
    return conn.hget(key, "body") or body   # type: ignore[return-value]


def retry_at(conn: Redis, event: Event, at: float) -> bool:
    """Next attempt at unix time `at`; False if another deliverer has claimed the event since."""
    return bool(conn.eval(keys.WEBHOOK_RETRY, 2, keys.WEBHOOK_DUE_KEY, keys.WEBHOOK_EVENT_KEY.format(event.id),
                          event.claim, repr(at), event.id))


def remove(conn: Redis, event_id: str) -> None:
    """The event is done with (delivered, or given up)."""
    with conn.pipeline() as pipe:
        pipe.zrem(keys.WEBHOOK_DUE_KEY, event_id)
        pipe.delete(keys.WEBHOOK_EVENT_KEY.format(event_id))
        pipe.execute()


def pending(conn: Redis) -> int:
    """Events not yet delivered nor given up."""
    return int(conn.zcard(keys.WEBHOOK_DUE_KEY))
