"""How the clients wait (client/waiting.py): long-polls without a progress callback (one request
for a whole job on the live stack), the event stream with one, and never a spinning loop against a
server that does not hold long-polls or bounds them lower. Live stack and mock transports."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from client import AsyncStarClient, StarClient, StarTimeout
from client.waiting import LONG_POLL_S, apply_event, parse_events

JOB_ID = "6f1c2f1e-8a0e-4c53-9a55-3f3c8a3b9d10"
PARAMS = {"prompt": "a fox", "negative_prompt": "", "size": 256, "n": 1, "seed": 1}


def job(status: str, **extra) -> dict:
    return {"id": JOB_ID, "status": status, "model": "tiny", "request": PARAMS, "timings": {}, **extra}


def job_gets(stack) -> float:
    text = stack.client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("star_api_requests_total{") and 'route="/jobs/{job_id}"' in line
               and 'method="GET"' in line)


def test_a_wait_without_progress_is_one_long_poll_on_the_live_stack(stack):
    with StarClient(stack.url) as star:
        accepted = star.submit("a red fox in snow", n=2)
        before, started = job_gets(stack), time.monotonic()
        done = star.wait(accepted.id, timeout=120)
        after, took = job_gets(stack), time.monotonic() - started
    assert done.status == "succeeded"
    # one request per long-poll window, answered when the job ended: 1 unless the (slowed) job took
    # longer than a window on a loaded machine; a polling client would have made dozens
    assert 1 <= after - before <= 1 + took // LONG_POLL_S


def test_async_wait_without_progress_long_polls_too(stack):
    async def scenario():
        async with AsyncStarClient(stack.url) as star:
            accepted = await star.submit("a blue square")
            return await star.wait(accepted.id, timeout=120)
    before, started = job_gets(stack), time.monotonic()
    assert asyncio.run(scenario()).status == "succeeded"
    assert 1 <= job_gets(stack) - before <= 1 + (time.monotonic() - started) // LONG_POLL_S


def mock(handler) -> tuple[StarClient, list[float]]:
    star = StarClient("http://star.test", transport=httpx.MockTransport(handler))
    sleeps: list[float] = []
    star._sleep = sleeps.append
    return star, sleeps


def test_a_server_that_answers_long_polls_at_once_is_not_asked_in_a_loop():
    answers = iter(["queued", "running", "running", "succeeded"])
    seen: list[httpx.Request] = []

    def old_server(request):   # ignores ?wait= and answers at once
        seen.append(request)
        return httpx.Response(200, json=job(next(answers)))
    star, sleeps = mock(old_server)
    assert star.wait(JOB_ID, poll_s=0.5).status == "succeeded"
    assert [r.url.params.get("wait") for r in seen] == ["30.0"] * 4
    assert sleeps == [0.5, 0.5, 0.5]   # one pause between answers that were not held


def test_a_server_with_a_lower_wait_bound_is_polled_instead():
    seen: list[httpx.Request] = []
    answers = iter(["running", "succeeded"])

    def strict(request):
        seen.append(request)
        if "wait" in request.url.params:
            return httpx.Response(422, json={"error": {"code": "invalid_request", "field": "wait",
                                                       "message": "`wait`: Input should be less than or equal to 10"}})
        return httpx.Response(200, json=job(next(answers)))
    star, sleeps = mock(strict)
    assert star.wait(JOB_ID, poll_s=0.2).status == "succeeded"
    assert [r.url.params.get("wait") for r in seen] == ["30.0", None, None] and sleeps == [0.2]


def test_a_timeout_bounds_the_long_poll_and_raises_with_the_last_view():
    seen: list[httpx.Request] = []

    def slow(request):
        seen.append(request)
        return httpx.Response(200, json=job("queued", queue_position=3))
    star, _ = mock(slow)
    with pytest.raises(StarTimeout) as caught:
        star.wait(JOB_ID, timeout=0.05)
    assert caught.value.job.queue_position == 3
    assert float(seen[0].url.params["wait"]) <= 0.05


def test_progress_follows_the_event_stream():
    stream = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in [
        ("queued", {"id": JOB_ID, "status": "queued", "queue_position": 1}),
        ("running", {"id": JOB_ID, "status": "running", "progress": None, "cancel_requested": False}),
        ("running", {"id": JOB_ID, "status": "running", "progress": {"scale": 3, "scales": 10},
                     "cancel_requested": False}),
        ("succeeded", job("succeeded", images=[{"url": "u", "seed": 1, "width": 256, "height": 256}])),
    ]) + ": ping\n\n"
    paths: list[str] = []

    def server(request):
        paths.append(request.url.path)
        if request.url.path.endswith("/events"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream.encode())
        return httpx.Response(200, json=job("queued", queue_position=2))
    star, _ = mock(server)
    seen = []
    done = star.wait(JOB_ID, on_progress=seen.append)
    assert paths == [f"/jobs/{JOB_ID}", f"/jobs/{JOB_ID}/events"]
    assert [(j.status, j.queue_position, j.progress and j.progress.scale) for j in seen] == [
        ("queued", 2, None), ("queued", 1, None), ("running", None, None), ("running", None, 3), ("succeeded", None, None)]
    assert done.images[0].url == "u"


def test_without_an_event_stream_progress_comes_from_short_long_polls():
    answers = iter(["running", "succeeded"])

    def no_stream(request):
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no", "field": None}})
        return httpx.Response(200, json=job("queued" if "wait" not in request.url.params else next(answers)))
    star, _ = mock(no_stream)
    seen = []
    assert star.wait(JOB_ID, poll_s=0.25, on_progress=seen.append).status == "succeeded"
    assert [j.status for j in seen] == ["queued", "running", "succeeded"]


def test_event_parsing():
    lines = ["retry: 2000", "", "event: running", 'data: {"progress": {"scale": 2, "scales": 7}}', "", ": ping", "",
             "event: not_found", 'data: {"error": {}}', ""]
    events = list(parse_events(lines))
    assert events == [("running", {"progress": {"scale": 2, "scales": 7}}), ("not_found", {"error": {}})]
    from client import Job

    queued = Job.from_json(job("queued", queue_position=4))
    assert apply_event(queued, *events[0]).progress.scales == 7
    assert apply_event(queued, *events[1]) is None   # the stream ends without the job: poll instead
