"""The webhook receiver printed in docs/clients.md works as written: run as its own process, it
takes a real delivery from the API, refuses a forged one and a stale one, and handles a duplicate
event id once."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker
from app.main import create_app
from app.redis_server import free_port
from app.webhook_delivery import signature

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
SECRET = "webhook-test-secret"   # = tests/webhooks/conftest.py


def receiver_code() -> str:
    section = DOC.read_text().split("## Webhooks: a receiver", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def documented_receiver(tmp_path, wait_until):
    script = tmp_path / "receiver.py"
    script.write_text(receiver_code())
    port = free_port()
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "STAR_WEBHOOK_SECRET": SECRET, "PORT": str(port)})
    url = f"http://127.0.0.1:{port}/star"

    def up() -> bool:
        try:
            return httpx.post(url, content=b"{}", timeout=1).status_code == 401
        except httpx.HTTPError:
            return False
    wait_until(lambda: up() or process.poll() is not None, 30, what="the receiver to listen")
    assert process.poll() is None, process.stderr.read()
    yield process, url
    process.terminate()


def test_the_documented_receiver_verifies_and_deduplicates(documented_receiver, webhook_api_settings, conn,
                                                           wait_until):
    process, url = documented_receiver
    publish_worker(conn, WorkerEntry(name="idle", model="tiny", state="ready", size=256, queue=queue_name("tiny")),
                   ttl_s=600)
    with TestClient(create_app(webhook_api_settings())) as api:
        job_id = api.post("/generate", json={"prompt": "a fox", "webhook_url": url}).json()["id"]
        api.delete(f"/jobs/{job_id}")
        wait_until(lambda: 'outcome="delivered"} 1.0' in api.get("/metrics").text, 30, what="the delivery")
    body = b'{"event_id": "evt_1", "event": "succeeded", "job": {"id": "j1", "images": []}}'
    now = int(time.time())
    for stamp in (now, now):   # the same event twice: printed once, answered 2xx both times
        assert httpx.post(url, content=body, headers={"Star-Signature": signature(SECRET, stamp, body)}).status_code == 204
    forged = httpx.post(url, content=body, headers={"Star-Signature": signature("not-the-secret", now, body)})
    stale = httpx.post(url, content=body, headers={"Star-Signature": signature(SECRET, now - 3600, body)})
    assert forged.status_code == 401 and stale.status_code == 401
    process.terminate()
    printed = process.communicate(timeout=10)[0].splitlines()
    assert printed == [f"canceled {job_id}", "succeeded j1"]
