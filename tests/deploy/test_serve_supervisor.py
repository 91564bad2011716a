"""`star serve` as a supervisor, with stand-ins for the API and the worker: it starts a private
Redis, gives both children the same settings, waits for /readyz, prints the URL, and on Ctrl-C or
SIGTERM lets the worker drain while Redis is still up, then leaves no process behind.

The stand-ins live in a temporary directory that shadows `app.main` and `worker` (the real
`app` package stays importable through the stand-in package's __path__), so these tests do not
depend on the real API, worker or model.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

FAKE_API = '''
import json
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from redis import Redis

def create_app(settings):
    app = FastAPI()
    conn = Redis.from_url(settings.redis_url)

    @app.get("/readyz")
    def readyz():
        return JSONResponse({}, status_code=200 if conn.get("fake-worker") else 503)

    @app.get("/env")
    def env():
        return {"api": {"redis_url": settings.redis_url, "storage_dir": str(settings.storage_dir),
                        "public_base_url": settings.public_base_url},
                "worker": json.loads(conn.get("fake-worker"))}
    return app
'''

FAKE_WORKER = '''
import json, os, signal, time
from pathlib import Path
from redis import Redis
from app.jobs.workers import WorkerEntry, publish_worker
from worker.settings import WorkerSettings

def main(argv=None):
    if os.environ.get("FAKE_WORKER_EXIT"):
        time.sleep(1)
        return int(os.environ["FAKE_WORKER_EXIT"])
    settings = WorkerSettings()
    conn = Redis.from_url(settings.redis_url)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *a: stop.append("SIGINT"))
    conn.set("fake-worker", json.dumps({
        "redis_url": settings.redis_url, "storage_dir": str(settings.storage_dir),
        "public_base_url": settings.public_base_url, "model": settings.model}))
    # what star serve waits for before it asks /readyz: a ready worker in the registry
    publish_worker(conn, WorkerEntry(name="fake", model=settings.model, state="ready", size=64), ttl_s=600)
    while not stop:
        time.sleep(0.05)
    time.sleep(0.5)  # "finishing the batch": Redis must still answer afterwards
    conn.set("drained", "1")
    Path(settings.storage_dir, "worker-stopped-by").write_text(",".join(stop))
    return 0
'''


@pytest.fixture
def fakes(tmp_path, root) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app/__init__.py").write_text(f"__path__.append({str(root / 'app')!r})\n")
    (tmp_path / "app/main.py").write_text(FAKE_API)
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker/__init__.py").write_text("")
    (tmp_path / "worker/main.py").write_text(FAKE_WORKER)
    return tmp_path


class Serve:
    def __init__(self, cwd: Path, port: int, **env: str):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("STAR_")}
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr = cwd / "serve.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir", "data",
             "--ready-timeout", "90", "--stop-timeout", "20"],
            cwd=cwd, env={**clean, "STAR_MODEL": "tiny", **env}, stdout=subprocess.PIPE,
            stderr=self.stderr.open("w"), text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, self.stderr.read_text()
                continue
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line within {timeout}s:\n{self.stderr.read_text()}")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def cleanup(self):
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def serve_factory():
    started = []

    def start(*args, **kwargs) -> Serve:
        serve = Serve(*args, **kwargs)
        started.append(serve)
        return serve

    yield start
    for serve in started:
        serve.cleanup()


def wait_group_gone(serve: Serve, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while serve.group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not serve.group_alive(), "a child of star serve is still running"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_serve_runs_and_stops_cleanly(fakes, serve_factory, how):
    from app.redis_server import free_port

    port = free_port()
    serve = serve_factory(fakes, port)
    line = serve.wait_for_line("STAR is serving at", timeout=120)
    base = f"http://127.0.0.1:{port}"
    assert line.strip() == f"STAR is serving at {base} (docs: {base}/docs)"

    with urllib.request.urlopen(base + "/env", timeout=10) as response:
        seen = json.load(response)
    api, worker = seen["api"], seen["worker"]
    assert api["redis_url"] == worker["redis_url"] and api["redis_url"].startswith("redis://127.0.0.1:")
    assert api["storage_dir"] == worker["storage_dir"] == str((fakes / "data/images").resolve())
    assert api["public_base_url"] == worker["public_base_url"] == base
    assert worker["model"] == "tiny"

    if how == "ctrl-c":  # the terminal sends SIGINT to the whole foreground process group
        os.killpg(serve.proc.pid, signal.SIGINT)
    else:  # docker stop, systemd, kill: SIGTERM to star serve alone
        serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=60) == 0, serve.stderr.read_text()
    wait_group_gone(serve)
    # The worker was asked once, by star serve, and could still write to Redis while draining.
    assert (fakes / "data/images/worker-stopped-by").read_text() == "SIGTERM"
    assert (fakes / "data/redis").is_dir()


def test_serve_stops_everything_when_a_child_dies(fakes, serve_factory):
    from app.redis_server import free_port

    serve = serve_factory(fakes, free_port(), FAKE_WORKER_EXIT="3")
    assert serve.proc.wait(timeout=90) == 1
    assert "star worker exited with 3" in serve.stderr.read_text()
    wait_group_gone(serve)
