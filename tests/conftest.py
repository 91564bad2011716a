"""Shared fixtures: a real Redis server for the session, one clean Redis database per user, the API
served in-process (TestClient, or uvicorn on a free port), workers run as `python -m worker`
subprocesses (what `star serve` and the containers run), and an S3-compatible server (moto's
`moto_server`, a separate process on loopback) with one fresh bucket per test.
"""
from __future__ import annotations

import itertools
import json
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


# ------------------------------------------------------------------------------------ S3 storage

S3_REGION = "us-east-1"


class S3Server:
    """`python -m moto.server` (PyPI `moto[server]`, the dev extra) on a free loopback port. With
    `auth`, it checks every request's signature and access key against the IAM users it knows:
    `credentials` are then those of a user it created, allowed everything on S3. Moto does not
    check presigned URLs (signature or expiry); with `auth` it cannot serve them at all."""

    def __init__(self, log_path: Path, auth: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.auth = log_path, auth
        self.credentials = {"AWS_ACCESS_KEY_ID": "star-test", "AWS_SECRET_ACCESS_KEY": "star-test-secret"}

    def start(self) -> "S3Server":
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        if self.auth:   # the four calls of _make_user run unauthenticated, every later one is checked
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)

        def answers() -> bool:
            assert self.process.poll() is None, f"moto_server exited: {self.log_path.read_text()[-2000:]}"
            try:
                return httpx.get(f"{self.url}/moto-api/", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(answers, 60, interval=0.1, what="moto_server to answer")
        if self.auth:
            self.credentials = self._make_user()
        return self

    def client(self, service: str = "s3", **credentials):
        import boto3
        from botocore.config import Config

        keys = {k.lower(): v for k, v in (credentials or self.credentials).items()}
        return boto3.session.Session().client(service, endpoint_url=self.url, region_name=S3_REGION,
                                              config=Config(s3={"addressing_style": "path"}), **keys)

    def _make_user(self) -> dict[str, str]:
        iam = self.client("iam")
        iam.create_user(UserName="star")
        iam.put_user_policy(UserName="star", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="star")["AccessKey"]
        credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        self.client(**credentials).create_bucket(Bucket="star-auth")
        return credentials

    def env(self) -> dict[str, str]:
        """The environment of a process using this server: its endpoint, region and credentials."""
        return {**self.credentials, "STAR_S3_ENDPOINT_URL": self.url, "STAR_S3_ADDRESSING_STYLE": "path",
                "AWS_REGION": S3_REGION}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory) -> Iterator[S3Server]:
    """A second server that checks signatures and access keys; bucket `star-auth` (S3Server)."""
    server = S3Server(tmp_path_factory.mktemp("s3-auth") / "moto.log", auth=True).start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS setting of the developer's shell or ~/.aws reaches the test (nor instance metadata)."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture
def s3_bucket(s3_server: S3Server, aws_env: pytest.MonkeyPatch) -> str:
    """A new, empty bucket on the session's S3 server; this process's AWS_* and STAR_S3_* point at it."""
    bucket = f"star-test-{next(_BUCKETS)}"
    s3_server.client().create_bucket(Bucket=bucket)
    for key, value in s3_server.env().items():
        aws_env.setenv(key, value)
    return bucket


_BUCKETS = itertools.count()
