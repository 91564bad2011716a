"""Redis restarted under a running service (append-only file on), and a burst of 10x the queue
limit: real Redis servers, the API under uvicorn, worker subprocesses (noop pipeline, slowed)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.redis_server import RedisServer


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test only (append-only persistence), so the test can restart it."""
    server = RedisServer(appendonly=True, data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


def test_redis_restart_loses_no_queued_job_and_everyone_reconnects(own_redis, tmp_path, worker_process,
                                                                   api_server, h):
    from app.settings import ApiSettings

    url = own_redis.url
    worker = worker_process(url, tmp_path / "images", tmp_path / "worker.log", script=[h.FAULTY_WORKER],
                            env={**h.FAST_WORKER, "STAR_MAX_BATCH": "1", "TEST_SCALE_DELAY_MS": "100"}).start()
    api = api_server(ApiSettings(redis_url=url, storage_dir=tmp_path / "images")).__enter__()
    try:
        ids = [h.post(api.client, f"a street, take {i}") for i in range(4)]
        h.wait_job(api.client, ids[0], h.running_at(3))
        own_redis.stop()                     # SIGTERM: Redis writes its append-only file and exits

        refused = api.client.post("/generate", json={"prompt": "while Redis is down"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "redis_unavailable"
        assert "127.0.0.1" not in refused.text   # no internals in the body
        assert api.client.get("/readyz").status_code == 503
        assert api.client.get("/healthz").status_code == 200
        time.sleep(1.5)

        own_redis.start()                    # same port, same data directory
        for job_id in ids:                   # the running one and the three queued ones
            view = h.wait_job(api.client, job_id, timeout=60)
            assert view["status"] == "succeeded" and len(view["images"]) == 1, view
        assert worker.process.poll() is None   # the same worker process carried on
        h.wait_job(api.client, ids[0], lambda v: api.client.get("/readyz").status_code == 200, timeout=20)
        after = h.post(api.client, "after the restart")
        assert h.wait_job(api.client, after, timeout=30)["status"] == "succeeded"
        assert "could not connect to Redis" in worker.tail(300) or "Redis unavailable" in worker.tail(300)
    finally:
        api.__exit__(None, None, None)
        worker.stop(timeout=10)


def test_a_burst_of_ten_times_the_queue_limit_gets_exactly_the_excess_refused(env_stack, h, tmp_path):
    limit = 5
    api, start_worker = env_stack(queue_limit=limit, retry_after_s=2)
    hold = tmp_path / "hold"
    start_worker("busy", STAR_MAX_BATCH="1", TEST_SLOW_PROMPT="slow", TEST_HOLD_FILE=str(hold))
    hold.touch()
    first = h.post(api.client, "a slow one")          # held after its first scale: nothing is dequeued
    h.wait_job(api.client, first, h.running_at(1))

    def submit(i: int) -> httpx.Response:
        return httpx.post(f"{api.url}/generate", json={"prompt": f"burst {i}"}, timeout=30)

    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(submit, range(10 * limit)))
        assert h.view(api.client, first)["status"] == "running"   # the burst happened behind one batch
    finally:
        hold.unlink()
    accepted = [a.json()["id"] for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code != 202]
    assert len(accepted) == limit and len(refused) == 9 * limit, sorted({a.status_code for a in answers})
    for answer in refused:
        assert answer.status_code == 429 and answer.headers["retry-after"] == "2"
        assert answer.json()["error"]["code"] == "queue_full"
    for job_id in [first, *accepted]:
        assert h.wait_job(api.client, job_id, timeout=60)["status"] == "succeeded"
