"""One live stack for the client tests: a real Redis database, the API under uvicorn and a worker
subprocess running the real `tiny` model, slowed a little after each scale
(tests/integration/slow_worker.py) so that queue positions and progress are observable."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker

SLOW_WORKER = str(Path(__file__).resolve().parents[1] / "integration" / "slow_worker.py")
SCALE_DELAY_MS = 80


@pytest.fixture(scope="session")
def stack(new_redis_db, tmp_path_factory, worker_process, api_server):
    from app.settings import ApiSettings

    redis_url, data = new_redis_db(), tmp_path_factory.mktemp("clients")
    worker = worker_process(redis_url, data / "images", data / "worker.log", script=[SLOW_WORKER], env={
        "STAR_MODEL": "tiny", "STAR_MAX_BATCH": "8", "STAR_MAX_WAIT_MS": "50", "STAR_WARMUP": "false",
        "TEST_SCALE_DELAY_MS": str(SCALE_DELAY_MS)})
    with worker:
        # event streams read the job every 0.1 s: the clients' progress shows (nearly) every scale
        settings = ApiSettings(redis_url=redis_url, storage_dir=data / "images", events_poll_s=0.1)
        with api_server(settings) as api:
            api.redis_url, api.worker, api.data = redis_url, worker, data
            yield api


@pytest.fixture
def idle_api(redis_url, tmp_path, api_server, monkeypatch, conn):
    """An API whose only 'worker' is a registry entry: jobs stay queued; fast event polls and pings."""
    from app.settings import ApiSettings

    monkeypatch.setenv("STAR_EVENTS_POLL_S", "0.05")
    monkeypatch.setenv("STAR_EVENTS_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("STAR_OPENAI_POLL_S", "0.05")
    publish_worker(conn, WorkerEntry(name="idle", model="tiny", state="ready", size=256,
                                         queue=queue_name("tiny")), ttl_s=60)
    with api_server(ApiSettings(redis_url=redis_url, storage_dir=tmp_path / "images")) as api:
        api.conn = conn
        yield api
