"""The Python client (client/) against the live stack (generate, progress, cancel, typed errors) and, with a mock
transport, its retry policy (Retry-After on 429/503, bounded, never other 4xx)."""
from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from PIL import Image

from client import (AsyncStarClient, Job, RetryPolicy, StarBusyError, StarClient, StarConnectionError,
                        StarRequestError, StarServerError, StarTimeout)
from app.redis_server import free_port


def png_info(data: bytes) -> tuple[tuple[int, int], dict]:
    image = Image.open(io.BytesIO(data))
    return image.size, dict(image.text)


def test_generate_saves_pngs_with_their_seeds_and_reports_progress(stack, tmp_path):
    seen: list[Job] = []
    with StarClient(stack.url) as star:
        result = star.generate("a red fox in snow", n=2, seed=7, negative_prompt="fog", poll_s=0.05,
                               on_progress=seen.append)
        models = star.models()
        assert models.sizes == (256,) and [m.sampler_head for m in models.models] == [False]
    assert result.job.status == "succeeded" and result.job.request.negative_prompt == "fog"
    assert result.job.request.sampler == "plain"   # auto, on a model without a sampler head
    assert [(i.seed, i.width, i.height) for i in result.images] == [(7, 256, 256), (8, 256, 256)]
    for image in result.images:
        size, text = png_info(image.save(tmp_path / f"{image.seed}.png").read_bytes())
        assert size == (256, 256) and text["seed"] == str(image.seed) and text["prompt"] == "a red fox in snow"
    assert seen[-1].status == "succeeded"
    scales = [job.progress.scale for job in seen if job.status == "running" and job.progress]
    assert scales and scales == sorted(scales) and seen[-2].progress.scales == 10
    timings = result.job.timings
    assert timings.model_s > 0 and timings.total_s >= timings.model_s and timings.finished_at > timings.queued_at


def test_async_client_generates_and_cancels(stack):
    async def scenario():
        async with AsyncStarClient(stack.url) as star:
            progress = []

            async def record(job):
                progress.append(job.status)

            done = await star.generate("a lighthouse at dusk", seed=3, poll_s=0.05, on_progress=record)
            accepted = await star.submit("a long job to cancel", n=4)
            await star.cancel(accepted.id)
            final = await star.wait(accepted.id, poll_s=0.05, timeout=30,
                                    on_progress=lambda job: None)   # a plain callback works too
            return done, progress, final

    done, progress, canceled = asyncio.run(scenario())
    assert done.job.status == "succeeded" and done.images[0].seed == 3 and done.images[0].png[:4] == b"\x89PNG"
    assert progress[-1] == "succeeded"
    assert canceled.status == "canceled" and canceled.images == ()


def test_cancel_a_running_job(stack):
    with StarClient(stack.url) as star:
        accepted = star.submit("cancel me", n=4)
        star.wait(accepted.id, timeout=30, poll_s=0.05,
                  on_progress=lambda job: job.status == "running" and star.cancel(accepted.id))
        assert star.get(accepted.id).status == "canceled"


def test_wait_timeout_and_generate_cancels_what_it_gave_up_on(stack):
    with StarClient(stack.url) as star:
        with pytest.raises(StarTimeout) as caught:
            star.generate("too slow for a tiny timeout", n=4, timeout=0.2, poll_s=0.05)
        job = caught.value.job
        assert job.status in ("queued", "running")
        assert star.wait(job.id, timeout=30, poll_s=0.05).status == "canceled"


def test_http_errors_are_typed_and_carry_the_servers_message(stack):
    with StarClient(stack.url) as star:
        with pytest.raises(StarRequestError) as caught:
            star.submit("x", n=9)
        assert caught.value.status == 422 and caught.value.field == "n" and "from 1 to 4" in caught.value.message
        with pytest.raises(StarRequestError) as caught:
            star.submit("x", size=1024)
        assert caught.value.code == "size_not_served" and "256" in caught.value.message
        with pytest.raises(StarRequestError) as caught:
            star.submit("x", sampler="head")           # tiny has no sampler head
        assert (caught.value.status, caught.value.code, caught.value.field) == (422, "sampler_not_available", "sampler")
        with pytest.raises(StarRequestError) as caught:
            star.get("00000000-0000-4000-8000-000000000000")
        assert caught.value.status == 404
    down = f"http://127.0.0.1:{free_port()}"
    with StarClient(down) as star, pytest.raises(StarConnectionError) as caught:
        star.submit("x")
    assert down in str(caught.value)


# ------------------------------------------------------------------------------ retries (mock server)

ACCEPTED = {"id": "6f1c2f1e-8a0e-4c53-9a55-3f3c8a3b9d10", "status": "queued", "queue_position": 0,
            "status_url": "http://star.test/jobs/6f1c2f1e-8a0e-4c53-9a55-3f3c8a3b9d10"}


def scripted(*answers: httpx.Response):
    """A mock transport answering in order; returns (transport, list of requests seen)."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0) if len(queue) > 1 else queue[0]
    return httpx.MockTransport(handle), seen


def error(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(status, headers=headers, json={"error": {"code": code, "message": f"{code}!", "field": None}})


def client(transport, **kwargs) -> tuple[StarClient, list[float]]:
    star = StarClient("http://star.test", api_key="k-123", transport=transport, **kwargs)
    sleeps: list[float] = []
    star._sleep = sleeps.append
    return star, sleeps


def test_429_and_503_are_retried_after_retry_after_with_one_idempotency_key():
    transport, seen = scripted(error(429, "queue_full", "2"), error(503, "no_worker", "1"),
                               httpx.Response(202, json=ACCEPTED))
    star, sleeps = client(transport)
    assert star.submit("a fox").id == ACCEPTED["id"]
    assert sleeps == [2.0, 1.0]
    assert len({r.headers["idempotency-key"] for r in seen}) == 1 and len(seen) == 3
    assert all(r.headers["authorization"] == "Bearer k-123" for r in seen)
    transport, seen = scripted(httpx.Response(202, json=ACCEPTED))
    star, _ = client(transport)
    star.submit("a fox")
    star.submit("a fox")
    assert seen[0].headers["idempotency-key"] != seen[1].headers["idempotency-key"]


def test_other_4xx_and_500_are_never_retried():
    for status, exc in ((422, StarRequestError), (404, StarRequestError), (500, StarServerError)):
        transport, seen = scripted(error(status, "nope", "1"))
        star, sleeps = client(transport)
        with pytest.raises(exc):
            star.submit("a fox")
        assert len(seen) == 1 and sleeps == []


def test_retries_are_bounded_in_attempts_and_in_time():
    transport, seen = scripted(error(429, "queue_full", "1"))
    star, sleeps = client(transport, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(StarBusyError) as caught:
        star.submit("a fox")
    assert len(seen) == 3 and sleeps == [1.0, 1.0] and caught.value.retry_after == 1.0
    transport, seen = scripted(error(503, "no_worker", "3600"))
    star, sleeps = client(transport)   # waiting an hour would exceed max_total_s: give up at once
    with pytest.raises(StarServerError) as caught:
        star.submit("a fox")
    assert len(seen) == 1 and sleeps == [] and caught.value.retry_after == 3600
    transport, seen = scripted(error(503, "no_worker"))   # no Retry-After: exponential backoff
    star, sleeps = client(transport, retry=RetryPolicy(max_attempts=4, backoff_s=0.5))
    with pytest.raises(StarServerError):
        star.get(ACCEPTED["id"])
    assert sleeps == [0.5, 1.0, 2.0]


def test_network_errors_retry_reads_but_not_submits():
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(202, json=ACCEPTED) if request.method == "POST" else error(404, "not_found")

    star, sleeps = client(httpx.MockTransport(flaky))
    with pytest.raises(StarRequestError):
        star.get(ACCEPTED["id"])              # read timeout, then 404
    assert calls == ["GET", "GET"] and len(sleeps) == 1
    calls.clear()
    with pytest.raises(StarConnectionError):
        star.submit("a fox")                  # a POST that may have arrived is not resent
    assert calls == ["POST"]


def test_the_api_key_comes_from_the_environment_and_stays_on_our_server(monkeypatch):
    monkeypatch.setenv("STAR_API_KEY", "from-env")
    monkeypatch.setenv("STAR_SERVER", "http://star.test/")
    transport, seen = scripted(httpx.Response(200, content=b"png"))
    star = StarClient(transport=transport)
    assert star.server == "http://star.test"
    star.download("http://star.test/images/abc.png")
    star.download("https://cdn.example/images/abc.png")
    assert seen[0].headers["authorization"] == "Bearer from-env"
    assert "authorization" not in seen[1].headers


def test_priority_is_sent_reported_and_refused_as_the_server_says(idle_api):
    with StarClient(idle_api.url) as star:
        low = star.submit("a lighthouse", priority="low")
        normal = star.submit("a lighthouse")
        assert star.get(low.id).request.priority == "low" and star.get(normal.id).request.priority == "normal"
        assert star.get(low.id).queue_position == 1   # behind the normal job
        (model,) = star.models().models
        assert model.queue_depth == 2 and list(model.lanes) == ["high", "normal", "low"]
        assert model.lanes["low"].queue_depth == 1 and model.lanes["low"].queue == "star-tiny@low"
        with pytest.raises(StarRequestError) as caught:
            star.submit("a lighthouse", priority="high")   # the server allows `high` to no key by default
        assert caught.value.status == 403 and caught.value.code == "priority_not_allowed"
        assert caught.value.field == "priority"
