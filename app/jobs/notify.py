"""Notices over Redis pub/sub: a job ended (`announce_end`, published in the transaction that ends
it: app.jobs.finish, release, cancel) and a webhook event was recorded (app.jobs.webhooks), and
the API's one subscriber per process (`listen`).

Pub/sub keeps nothing: a notice published while a subscriber is reconnecting is lost. So a notice
is only a wake-up; what it announces is always read back from the job's record or the outbox,
and every waiter also re-reads on its own after a bounded time (app.longpoll, app.webhook_delivery).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis import RedisError
from rq.utils import as_text

from app.jobs import keys

log = logging.getLogger(__name__)


def announce_end(pipe, job_id: str) -> None:
    """On the ending's pipeline: tell long-polls of this job that it ended."""
    pipe.publish(keys.ENDED_CHANNEL, job_id)


async def listen(redis_url: str, on_ended: Callable[[str], None], on_webhook: Callable[[], None],
                 retry_s: float = 1.0) -> None:
    """Forever: subscribe to the notices and call on_ended(job id) or on_webhook() for each; after
    a lost connection, subscribe again (calling on_webhook once: events may have been missed)."""
    import redis.asyncio as aioredis

    while True:
        client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2.0, health_check_interval=30)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(keys.ENDED_CHANNEL, keys.WEBHOOK_CHANNEL)
                on_webhook()
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    if as_text(message["channel"]) == keys.ENDED_CHANNEL:
                        on_ended(as_text(message["data"]))
                    else:
                        on_webhook()
        except (RedisError, OSError) as exc:
            log.warning("job notices: Redis subscription lost (%s: %s); subscribing again in %gs",
                        type(exc).__name__, exc, retry_s)
        finally:
            await client.aclose()
        await asyncio.sleep(retry_s)
