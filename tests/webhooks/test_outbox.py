"""The webhook outbox in Redis: an event waits there until some API process delivers it (also when
the delivering process is killed mid-delivery), is given up after STAR_WEBHOOK_MAX_AGE_S, and a
target is checked again at delivery time. Jobs end here by DELETE while queued (a registry-only
worker never takes them) or, for the kill test, on a real worker (noop pipeline)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker
from app.main import create_app
from app.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "webhook-test-secret"   # = tests/webhooks/conftest.py


@pytest.fixture
def registry(conn):
    publish_worker(conn, WorkerEntry(name="idle", model="tiny", state="ready", size=256, queue=queue_name("tiny")),
                   ttl_s=600)


def metric(client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {line_start} in /metrics")


def submit_and_cancel(client, url: str) -> str:
    """A job with a webhook, canceled while queued: its `canceled` event goes to the outbox."""
    answer = client.post("/generate", json={"prompt": "a red fox", "webhook_url": url})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert client.delete(f"/jobs/{job_id}").json()["status"] == "canceled"
    return job_id


def test_an_event_waits_in_redis_until_a_process_delivers_it(webhook_api_settings, registry, receiver,
                                                             verify, wait_until):
    path = f"/ok/{uuid.uuid4().hex}"
    with TestClient(create_app(webhook_api_settings(webhook_concurrency=0))) as silent:   # delivers nothing
        job_id = submit_and_cancel(silent, receiver.url + path)
        assert metric(silent, "star_webhook_pending") == 1
    assert receiver.at(path) == []
    with TestClient(create_app(webhook_api_settings())) as deliverer:
        wait_until(lambda: receiver.at(path), 30, what="the delivery")
        wait_until(lambda: metric(deliverer, "star_webhook_pending") == 0, 30, what="the outbox to empty")
    (delivery,) = receiver.at(path)
    assert delivery.json["event"] == "canceled" and delivery.json["job"]["id"] == job_id
    assert delivery.json["job"]["status"] == "canceled" and verify(SECRET, delivery.headers["Star-Signature"],
                                                                   delivery.body)


def test_a_target_that_keeps_failing_is_given_up_after_the_bound(webhook_api_settings, registry, receiver,
                                                                 wait_until):
    path = f"/down/{uuid.uuid4().hex}"   # answers 500 to everything
    with TestClient(create_app(webhook_api_settings(webhook_max_age_s=2.0))) as client:
        submit_and_cancel(client, receiver.url + path)
        wait_until(lambda: metric(client, 'star_webhook_deliveries_total{outcome="gave_up"}') == 1, 60,
                   what="the event to be given up")
        assert metric(client, "star_webhook_pending") == 0
        attempts = len(receiver.at(path))
        time.sleep(2.5)   # longer than any backoff left: nothing more is sent
        assert len(receiver.at(path)) == attempts
    assert attempts >= 1 and len({d.headers["Star-Event-Id"] for d in receiver.at(path)}) == 1


def test_a_target_is_checked_again_at_delivery(webhook_api_settings, registry, receiver, wait_until):
    """Accepted by an API that allows loopback targets, refused by the one that delivers: a name
    that resolves elsewhere by the time of delivery (DNS rebinding) is caught the same way."""
    path = f"/ok/{uuid.uuid4().hex}"
    with TestClient(create_app(webhook_api_settings(webhook_concurrency=0))) as permissive, \
            TestClient(create_app(webhook_api_settings(webhook_allow_private=False))) as strict:
        submit_and_cancel(permissive, receiver.url + path)
        wait_until(lambda: metric(strict, 'star_webhook_deliveries_total{outcome="refused"}') == 1, 30,
                   what="the delivery to be refused")
        assert metric(strict, "star_webhook_pending") == 0
    assert receiver.at(path) == []


def test_a_job_that_no_worker_pulls_before_its_deadline_sends_its_expired_event(webhook_api_settings, registry,
                                                                                conn, receiver, verify, wait_until):
    """The only 'worker' never pulls: the reaper of the API records the overdue job as expired."""
    path = f"/ok/{uuid.uuid4().hex}"
    settings = webhook_api_settings(job_deadline_s=1.0, reaper_s=0.3, worker_deadline_s=1.0)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/generate", json={"prompt": "a red fox", "webhook_url": receiver.url + path})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        wait_until(lambda: receiver.at(path), 60, what="the expired event")
        job = client.get(f"/jobs/{job_id}").json()
        wait_until(lambda: metric(client, "star_webhook_pending") == 0, 30, what="the outbox to empty")
    assert job["status"] == "expired" and job["error"]["code"] == "expired"
    assert conn.llen(f"rq:queue:{queue_name('tiny')}") == 0   # taken off its queue
    (delivery,) = receiver.at(path)
    assert delivery.json["event"] == "expired" and delivery.json["job"] == job
    assert verify(SECRET, delivery.headers["Star-Signature"], delivery.body)


class ApiProcess:
    """`star api` as its own process (so that it can be killed with SIGKILL)."""

    def __init__(self, redis_url: str, storage_dir: Path, log_path: Path, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "STAR_REDIS_URL": redis_url, "STAR_STORAGE_DIR": str(storage_dir),
               "STAR_PUBLIC_BASE_URL": self.url, **{f"STAR_{k.upper()}": v for k, v in settings.items()}}
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(self.port)],
                                        cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: str = "term") -> None:
        if self.process.poll() is None:
            self.process.kill() if sig == "kill" else self.process.terminate()
        self.process.wait(30)
        self.log.close()


def test_at_least_once_when_the_delivering_process_is_killed(redis_url, tmp_path, worker_process, receiver,
                                                            verify, wait_until):
    settings = {"webhook_secret": SECRET, "webhook_allow_private": "true", "webhook_timeout_s": "5",
                "webhook_backoff_s": "0.3", "log_level": "warning"}
    images = tmp_path / "images"
    path = f"/hang/{uuid.uuid4().hex}"   # the first delivery is held without an answer
    with worker_process(redis_url, images, tmp_path / "worker.log",
                        env={"STAR_MODEL": "noop:64", "STAR_WARMUP": "false"}):
        first = ApiProcess(redis_url, images, tmp_path / "api-1.log", **settings)
        second = None
        try:
            wait_until(first.ready, 60, what="the first API")
            answer = httpx.post(first.url + "/generate", json={"prompt": "a fox", "webhook_url": receiver.url + path})
            assert answer.status_code == 202, answer.text
            wait_until(lambda: receiver.at(path), 60, what="the first delivery attempt")
            first.stop("kill")   # SIGKILL mid-delivery: the event is claimed, not delivered
            assert len(receiver.at(path)) == 1   # killed within its 5 s attempt, before any retry of its own
            receiver.release()
            second = ApiProcess(redis_url, images, tmp_path / "api-2.log", **settings)
            wait_until(lambda: len(receiver.at(path)) >= 2, 60, what="the event to be delivered again")
            with httpx.Client(base_url=second.url) as client:
                wait_until(lambda: metric(client, "star_webhook_pending") == 0, 30, what="the outbox to empty")
        finally:
            first.stop("kill")
            if second is not None:
                second.stop()
    got = receiver.at(path)
    assert len(got) == 2 and got[0].body == got[1].body
    assert got[0].headers["Star-Event-Id"] == got[1].headers["Star-Event-Id"]
    assert got[1].json["event"] == "succeeded" and got[1].json["job"]["id"] == answer.json()["id"]
    assert all(verify(SECRET, d.headers["Star-Signature"], d.body) for d in got)
