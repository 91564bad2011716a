"""Webhook deliveries end to end: a real worker (noop pipeline) runs the jobs, the API under
uvicorn delivers their events to a real HTTP receiver on loopback, all on a real Redis. Signed
bodies that carry the job as GET /jobs/{id} shows it, event ids unique per event and stable across
retries, retries with backoff, `running` events when asked, the OpenAI route's extra body, and the
long-poll answering when the job ends."""
from __future__ import annotations

import time
import uuid

import pytest

from app.schemas import WebhookEvent
from app.settings import ApiSettings

SECRET = "webhook-test-secret"   # = tests/webhooks/conftest.py
BACKOFF_S = 0.3


@pytest.fixture(scope="module")
def stack(new_redis_db, tmp_path_factory, worker_process, api_server):
    redis_url, data = new_redis_db(), tmp_path_factory.mktemp("webhooks")
    worker = worker_process(redis_url, data / "images", data / "worker.log", env={
        "STAR_MODEL": "noop:64:30", "STAR_WARMUP": "false", "STAR_MAX_WAIT_MS": "0"})
    settings = ApiSettings(redis_url=redis_url, storage_dir=data / "images", webhook_secret=SECRET,
                           webhook_allow_private=True, webhook_backoff_s=BACKOFF_S, webhook_max_backoff_s=2.0,
                           webhook_max_age_s=120.0, webhook_timeout_s=5.0)
    with worker, api_server(settings) as api:
        yield api


def submit(stack, receiver, kind: str, **fields) -> tuple[str, str]:
    path = f"/{kind}/{uuid.uuid4().hex}"
    answer = stack.client.post("/generate", json={"prompt": "a red circle", "webhook_url": receiver.url + path,
                                                  **fields})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"], path


def deliveries(receiver, path: str, count: int, wait_until) -> list:
    wait_until(lambda: len(receiver.at(path)) >= count, 60, what=f"{count} deliveries to {path}")
    return receiver.at(path)


def metric(stack, line_start: str) -> float:
    for line in stack.client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {line_start} in /metrics")


def test_a_finished_job_is_delivered_once_signed_with_the_job_as_get_shows_it(stack, receiver, verify, wait_until):
    job_id, path = submit(stack, receiver, "ok")
    (delivery,) = deliveries(receiver, path, 1, wait_until)
    event = delivery.json
    assert event["event"] == "succeeded" == delivery.headers["Star-Event"]
    assert event["event_id"] == delivery.headers["Star-Event-Id"] and event["event_id"].startswith("evt_")
    assert delivery.headers["Content-Type"] == "application/json"
    assert event["job"] == stack.client.get(f"/jobs/{job_id}").json()   # the same body GET returns
    assert WebhookEvent.model_validate_json(delivery.body).job.id == job_id   # as the OpenAPI schema says
    assert event["job"]["status"] == "succeeded" and len(event["job"]["images"]) == 1
    signature = delivery.headers["Star-Signature"]
    assert verify(SECRET, signature, delivery.body)
    assert not verify("another-secret", signature, delivery.body)
    assert not verify(SECRET, signature, delivery.body.replace(b"succeeded", b"failed"))   # tampered
    wait_until(lambda: metric(stack, "star_webhook_pending") == 0, 30, what="the outbox to empty")
    assert len(receiver.at(path)) == 1   # final event only (the default): no `running`, no duplicate


def test_running_events_when_asked_each_with_its_own_event_id(stack, receiver, verify, wait_until):
    job_id, path = submit(stack, receiver, "ok", webhook_events=["running", "final"])
    got = deliveries(receiver, path, 2, wait_until)
    events = {d.json["event"]: d.json for d in got}
    assert set(events) == {"running", "succeeded"}
    assert events["running"]["event_id"] != events["succeeded"]["event_id"]
    assert all(e["job"]["id"] == job_id for e in events.values())
    # the body is the job when the event is first sent: a fast job may have ended by then
    assert events["running"]["job"]["status"] in ("running", "succeeded")
    assert all(verify(SECRET, d.headers["Star-Signature"], d.body) for d in got)


def test_failed_attempts_are_retried_with_backoff_under_the_same_event_id(stack, receiver, verify, wait_until):
    before = metric(stack, 'star_webhook_deliveries_total{outcome="failed"}')
    _, path = submit(stack, receiver, "flaky")   # answers 500, 500, then 200
    got = deliveries(receiver, path, 3, wait_until)
    assert len({d.headers["Star-Event-Id"] for d in got}) == 1
    assert len({d.body for d in got}) == 1   # byte for byte the same event
    assert all(verify(SECRET, d.headers["Star-Signature"], d.body) for d in got)
    gaps = [b.at - a.at for a, b in zip(got, got[1:])]
    assert gaps[0] >= BACKOFF_S * 0.95 and gaps[1] >= 2 * BACKOFF_S * 0.95   # at least the backoff, doubling
    wait_until(lambda: metric(stack, "star_webhook_pending") == 0, 30, what="the outbox to empty")
    assert len(receiver.at(path)) == 3
    assert metric(stack, 'star_webhook_deliveries_total{outcome="failed"}') - before == 2


def test_the_openai_route_takes_a_webhook_in_its_extra_body(stack, receiver, wait_until):
    path = f"/ok/{uuid.uuid4().hex}"
    answer = stack.client.post("/v1/images/generations", json={"prompt": "a blue square", "size": "64x64",
                                                                "webhook_url": receiver.url + path})
    assert answer.status_code == 200, answer.text
    (delivery,) = deliveries(receiver, path, 1, wait_until)
    assert delivery.json["event"] == "succeeded"
    assert delivery.json["job"]["images"][0]["url"] == answer.json()["data"][0]["url"]


def test_long_poll_answers_when_the_job_ends(stack):
    job_id = stack.client.post("/generate", json={"prompt": "a green ring", "n": 2}).json()["id"]
    started = time.monotonic()
    answer = stack.client.get(f"/jobs/{job_id}", params={"wait": 60})
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
    assert time.monotonic() - started < 50   # answered at the end, not at the end of the wait
