"""Helpers of the fault tests: workers are `tests/reliability/faulty_worker.py` subprocesses (the
real worker serving the noop pipeline, with injected faults), the API runs under uvicorn, Redis
is the session's server (or one of the test's own, to restart it). Fixtures come from
tests/conftest.py."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

FAULTY_WORKER = str(Path(__file__).with_name("faulty_worker.py"))
FINAL = ("succeeded", "failed", "canceled", "expired")
FAST_WORKER = {"STAR_MODEL": "noop:64", "STAR_WARMUP": "false", "STAR_HEARTBEAT_S": "0.3",
               "STAR_WORKER_DEADLINE_S": "1.5", "STAR_MAX_WAIT_MS": "300", "STAR_MAX_BATCH": "4"}


def view(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()


def wait_job(client: httpx.Client, job_id: str, predicate=lambda v: v["status"] in FINAL,
             timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = view(client, job_id)
        if predicate(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: condition not met in {timeout}s; last view {current}")
        time.sleep(0.05)


def running_at(k: int):
    return lambda v: v["status"] == "running" and (v["progress"] or {}).get("scale", 0) >= k


def post(client: httpx.Client, prompt: str = "a lighthouse", **body) -> str:
    response = client.post("/generate", json={"prompt": prompt, **body})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def stored_pngs(storage_dir: Path) -> list[Path]:
    return sorted(p for p in storage_dir.rglob("*.png") if not p.name.startswith(".tmp-"))


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    """The helpers above, for the test modules (conftest modules cannot be imported)."""
    return SimpleNamespace(view=view, wait_job=wait_job, running_at=running_at, post=post,
                           stored_pngs=stored_pngs, FINAL=FINAL, FAULTY_WORKER=FAULTY_WORKER,
                           FAST_WORKER=FAST_WORKER)


@pytest.fixture
def env_stack(redis_url, tmp_path, worker_process, api_server):
    """`stack(**api_overrides)` -> (api, start_worker); workers: `start_worker(**env)`."""
    from app.settings import ApiSettings

    opened = []

    def start_worker(name: str = "w", start: bool = True, **env):
        worker = worker_process(redis_url, tmp_path / "images", tmp_path / f"{name}.log",
                                script=[FAULTY_WORKER], env={**FAST_WORKER, **env},
                                name=f"{name}-{time.monotonic_ns()}")
        opened.append(worker)
        return worker.start() if start else worker

    def stack(**api_overrides):
        settings = ApiSettings(redis_url=redis_url, storage_dir=tmp_path / "images", **api_overrides)
        api = api_server(settings).__enter__()
        opened.append(api)
        return api, start_worker

    yield stack
    for item in reversed(opened):
        if hasattr(item, "server"):
            item.__exit__(None, None, None)
        else:
            item.stop(timeout=10)
