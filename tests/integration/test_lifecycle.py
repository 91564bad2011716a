"""Job lifecycle end to end (real Redis, API under uvicorn, the real `tiny` model in a worker
subprocess slowed between scales by tests/integration/slow_worker.py): cancel while queued and
while running, a full queue, expiry, what `rq info` shows, and draining on SIGTERM."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry

from app.jobs.rq_adapter import SERIALIZER, connect

SLOW_WORKER = str(Path(__file__).with_name("slow_worker.py"))
SCALE_DELAY_MS = 0   # the tests hold a batch (TEST_HOLD_FILE) where they must act while it runs


@pytest.fixture(scope="module")
def stack(new_redis_db, tmp_path_factory, worker_process):
    redis_url, data = new_redis_db(), tmp_path_factory.mktemp("lifecycle")
    worker = worker_process(redis_url, data / "images", data / "worker.log", script=[SLOW_WORKER], env={
        "STAR_MODEL": "tiny", "STAR_MAX_BATCH": "4", "STAR_MAX_WAIT_MS": "600", "STAR_WARMUP": "false",
        "TEST_SCALE_DELAY_MS": str(SCALE_DELAY_MS), "TEST_HOLD_FILE": str(data / "hold")})
    with worker:
        worker.redis_url, worker.data = redis_url, data
        yield worker


@contextlib.contextmanager
def held(stack):
    """The running batch waits after each scale until the block ends (slow_worker.py): what the
    test does meanwhile happens mid-batch however fast or busy the machine is. Yields `hold_only`:
    from then on only a batch with a prompt containing that word waits."""
    hold = stack.data / "hold"

    def hold_only(word: str) -> None:
        staged = hold.with_suffix(".new")
        staged.write_text(word)
        staged.replace(hold)

    hold_only("")
    try:
        yield hold_only
    finally:
        hold.unlink()


@pytest.fixture
def api(stack, api_server):
    """An API on the stack's Redis; settings overridable per test."""
    from app.settings import ApiSettings

    servers = []

    def start(**overrides):
        settings = ApiSettings(redis_url=stack.redis_url, storage_dir=stack.data / "images", **overrides)
        server = api_server(settings).__enter__()
        servers.append(server)
        return server.client

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def view(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()


def until(client, job_id, predicate, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = view(client, job_id)
        if predicate(current):
            return current
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: condition not met; last view {current}")


def post(client, **body) -> str:
    response = client.post("/generate", json={"prompt": "a harbour at night", **body})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def running_at_scale(k: int):
    return lambda v: v["status"] == "running" and (v["progress"] or {}).get("scale", 0) >= k


def done(v: dict) -> bool:
    return v["status"] not in ("queued", "running")


def test_cancel_while_running_leaves_the_batch_mate_intact(api, stack):
    client = api()
    with held(stack) as hold_only:
        blocker = post(client, n=4)                 # a full batch, held: the next two queue behind it
        until(client, blocker, running_at_scale(1))
        doomed = post(client, seed=1, prompt="a harbour at night, mates")
        mate = post(client, seed=2, prompt="a harbour at night, mates")
        hold_only("mates")                          # the blocker ends; the two queued jobs are one batch, held
        until(client, doomed, running_at_scale(1))
        assert view(client, mate)["status"] == "running"

        rq = str(Path(sys.executable).with_name("rq"))   # the `rq` command, as an operator types it
        info = subprocess.run([rq, "info", "--url", stack.redis_url], capture_output=True, text=True,
                              timeout=60).stdout
        assert "star-tiny" in info and "2 executing" in info
        assert f"{stack.name}" in info and "busy" in info

        response = client.delete(f"/jobs/{doomed}")
        assert response.status_code == 202 and response.json()["cancel_requested"] is True
    canceled = until(client, doomed, done)
    assert canceled["status"] == "canceled" and canceled["images"] is None
    assert canceled["progress"] is None and canceled["timings"]["finished_at"]
    finished = until(client, mate, done)
    assert finished["status"] == "succeeded" and len(finished["images"]) == 1
    assert view(client, blocker)["status"] == "succeeded"
    conn = connect(stack.redis_url)
    assert Job.fetch(doomed, connection=conn, serializer=SERIALIZER).get_status() == JobStatus.CANCELED
    assert doomed in CanceledJobRegistry("star-tiny", connection=conn).get_job_ids()


def test_cancel_while_queued_and_a_full_queue(api, stack):
    client = api(queue_limit=1, retry_after_s=3)
    with held(stack):
        busy = post(client, n=4)                        # fills the batch (max 4 images)
        until(client, busy, running_at_scale(1))
        waiting = post(client)
        assert view(client, waiting)["status"] == "queued" and view(client, waiting)["queue_position"] == 0
        full = client.post("/generate", json={"prompt": "one too many"})
        assert full.status_code == 429 and full.headers["retry-after"] == "3"
        assert full.json()["error"]["code"] == "queue_full"

        response = client.delete(f"/jobs/{waiting}")
        assert response.status_code == 200 and response.json()["status"] == "canceled"
        room = post(client)                             # the canceled job left the queue
    assert until(client, busy, done)["status"] == "succeeded"
    assert until(client, room, done)["status"] == "succeeded"
    gone = view(client, waiting)
    assert gone["status"] == "canceled" and gone["timings"]["started_at"] is None and gone["images"] is None


def test_a_job_past_its_deadline_expires_unrun(api, stack):
    client = api(job_deadline_s=0.5)
    with held(stack):
        busy = post(client, n=4)
        until(client, busy, running_at_scale(1))
        late = post(client)
        time.sleep(0.6)
        reported = view(client, late)                   # reported by the API before any worker looks
        assert reported["status"] == "expired" and reported["error"]["code"] == "expired"
    assert until(client, busy, done)["status"] == "succeeded"
    conn = connect(stack.redis_url)
    until(client, late, lambda v: late in FailedJobRegistry("star-tiny", connection=conn).get_job_ids())
    final = view(client, late)                      # the worker dequeued it and did not run it
    assert final["status"] == "expired" and final["timings"]["started_at"] is None
    assert "deadline" in final["error"]["message"]


def test_sigterm_drains_the_current_batch_then_exits_0(api, stack):
    client = api()
    with held(stack):
        running = post(client, n=4)
        until(client, running, running_at_scale(1))
        behind = post(client)
        stack.process.send_signal(15)
        until(client, running, lambda v: stack.state() == "draining", timeout=30)
        assert client.get("/readyz").status_code == 503
    assert stack.process.wait(60) == 0
    assert view(client, running)["status"] == "succeeded"
    assert view(client, behind)["status"] == "queued"   # not taken by a draining worker
    assert stack.state() is None
