"""Shared fixtures: a real Redis server for the session, one clean Redis database per user, the API
served in-process (TestClient, or uvicorn on a free port) and workers run as `python -m worker`
subprocesses (what `star serve` and the containers run).
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from app.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
_DATABASES = range(1, 16)
_HELD: set[int] = set()   # databases of long-lived users (new_redis_db), out of the rotation
_TURNS = itertools.count()


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _no_star_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in tests come from the test, not from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("STAR_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=False).start()
    yield server
    server.stop()


def new_redis_url(server: RedisServer, hold: bool = False) -> str:
    """A flushed database of the session's server. One-test users share the databases in rotation;
    a long-lived user (`hold`: a module- or session-scoped stack whose worker runs on) keeps its
    database for the rest of the session, so no later test is handed it, flushed under that worker."""
    free = [db for db in _DATABASES if db not in _HELD]
    assert len(free) > 1, "every Redis database is held by a long-lived fixture"
    db = free[next(_TURNS) % len(free)]
    if hold:
        _HELD.add(db)
    url = f"redis://127.0.0.1:{server.port}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def new_redis_db(redis_server: RedisServer) -> Callable[[], str]:
    """For module- and session-scoped users: `new_redis_db()` -> URL of a flushed database that no
    other test gets afterwards."""
    return lambda: new_redis_url(redis_server, hold=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return new_redis_url(redis_server)


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def wait_until() -> Callable[..., object]:
    return wait_for


# ------------------------------------------------------------------------------------ the API

def api_settings(redis_url: str, storage_dir: Path, **overrides):
    from app.settings import ApiSettings

    values = dict(redis_url=redis_url, storage_dir=storage_dir, public_base_url="http://testserver")
    return ApiSettings(**{**values, **overrides})


@pytest.fixture
def make_api_settings(redis_url: str, tmp_path: Path):
    """ApiSettings on this test's Redis database and storage directory, plus overrides."""
    def make(**overrides):
        return api_settings(overrides.pop("redis_url", redis_url), tmp_path / "images", **overrides)
    return make


class ApiServer:
    """The API under uvicorn in a thread, on a free port: real HTTP, real concurrency."""

    def __init__(self, settings):
        import uvicorn

        from app.main import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = settings.model_copy(update={"public_base_url": self.url})
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        wait_for(lambda: self.server.started, 10, what="uvicorn to start")
        self.client = httpx.Client(base_url=self.url, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)


# ------------------------------------------------------------------------------------ workers

@dataclass
class WorkerProcess:
    """A `python -m worker` subprocess (or a wrapper script) with STAR_* settings."""

    redis_url: str
    storage_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    script: list[str] = field(default_factory=lambda: ["-m", "worker"])
    name: str = field(default_factory=lambda: f"test-worker-{time.monotonic_ns()}")
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "WorkerProcess":
        env = {**os.environ, "STAR_REDIS_URL": self.redis_url, "STAR_STORAGE_DIR": str(self.storage_dir),
               "STAR_NAME": self.name, "STAR_METRICS_PORT": "0", "STAR_HEARTBEAT_S": "1",
               "STAR_LOG_LEVEL": "INFO",
               # one torch thread: on a few shared cores, OpenMP threads that spin against other
               # processes make the tiny model 10-20x slower
               "OMP_NUM_THREADS": "1", **self.env}
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, *self.script], cwd=ROOT, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.state() in ("ready", "busy") or self.process.poll() is not None,
                     timeout, interval=0.1, what=f"worker {self.name} to be ready")
        except AssertionError:
            self.stop()
            raise AssertionError(f"worker did not start:\n{self.tail()}") from None
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.tail()}")
        return self

    def state(self) -> str | None:
        from app.jobs.workers import live_workers

        conn = redis.Redis.from_url(self.redis_url)
        try:
            return next((e.state for e in live_workers(conn) if e.name == self.name), None)
        finally:
            conn.close()

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def tail(self, lines: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def worker_process() -> type[WorkerProcess]:
    return WorkerProcess


@pytest.fixture(scope="session")
def api_server() -> Callable[..., ApiServer]:
    """`with api_server(settings) as api:` -> api.url, api.client (httpx)."""
    return ApiServer
