"""`star serve`: everything on one machine: a private Redis (app.redis_server), the API and one
worker as child processes of this one, started in order, stopped in reverse on Ctrl-C or SIGTERM
(the worker finishes its batch). Registered in the `star` command by app/cli.py.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from redis import RedisError


def http_get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (local URL)
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("STAR_HOST", "127.0.0.1"),
                        help="interface the API binds to (default: STAR_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")),
                        help="API port (default: $PORT or 8000)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="Redis data (DATA_DIR/redis) and, unless STAR_STORAGE_DIR is set, "
                        "images (DATA_DIR/images); default ./data")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for /readyz (default 600)")
    parser.add_argument("--stop-timeout", type=float, default=60.0,
                        help="seconds the worker gets to finish its batch on shutdown (default 60)")


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _sigint_blocked(start: Callable[[], object]) -> None:
    """Start a child that does not receive the terminal's Ctrl-C: `star serve` stops it in order.

    SIGINT is blocked (not ignored) while forking; a blocked signal mask survives exec, so the
    child never sees the SIGINT that the terminal sends to the whole process group.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _spawn(argv: list[str], env: dict[str, str], children: list[subprocess.Popen]) -> None:
    _sigint_blocked(lambda: children.append(subprocess.Popen(argv, env=env)))


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _serve_env(args: argparse.Namespace, redis_url: str) -> dict[str, str]:
    from app.redis_server import free_port

    env = dict(os.environ)
    env["STAR_REDIS_URL"] = redis_url
    env["STAR_HOST"], env["STAR_PORT"] = args.host, str(args.port)
    env.setdefault("STAR_PUBLIC_BASE_URL", f"http://{_local(args.host)}:{args.port}")
    storage = Path(env.get("STAR_STORAGE_DIR") or args.data_dir / "images").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    env["STAR_STORAGE_DIR"] = str(storage)
    env.setdefault("STAR_METRICS_PORT", str(free_port()))  # 9100 may be taken on a laptop
    return env


def _label(child: subprocess.Popen) -> str:
    return "star " + " ".join(cast(list[str], child.args)[3:])  # args: python -m app.cli SUBCOMMAND ...


def _wait_ready(url: str, redis_url: str, children: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """Until /readyz answers 200. While the worker loads its model the registry is read in Redis
    instead of polling /readyz, whose 503s would fill the API's access log (one line a second)."""
    from app.jobs.rq_adapter import connect
    from app.jobs.workers import READY_STATES, live_workers

    conn = connect(redis_url, socket_timeout=2.0, retries=0)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for child in children:
                if child.poll() is not None:
                    raise RuntimeError(f"{_label(child)} exited with {child.returncode}")
            try:
                if any(e.state in READY_STATES and e.size for e in live_workers(conn)) and http_get(url, 2.0)[0] == 200:
                    return
            except (OSError, RedisError):   # the API is not listening yet; Redis answers below
                pass
            time.sleep(0.5)
    finally:
        conn.close()
    raise RuntimeError(f"{url} was not ready within {timeout_s:.0f}s")


def _stop_children(children: Sequence[subprocess.Popen], timeout_s: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run(args: argparse.Namespace) -> int:
    old_handlers = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    from app.redis_server import RedisServer
    from worker.settings import WorkerSettings

    children: list[subprocess.Popen] = []
    redis, code = RedisServer(data_dir=args.data_dir / "redis"), 0
    try:
        _sigint_blocked(redis.start)
        env = _serve_env(args, redis.url)
        model = env.get("STAR_MODEL") or WorkerSettings.model_fields["model"].default
        print(f"star serve: Redis at {redis.url}; starting the API and a worker (model {model}); "
              "waiting for /readyz", file=sys.stderr, flush=True)
        star = [sys.executable, "-m", "app.cli"]
        _spawn(star + ["worker"], env, children)
        _spawn(star + ["api", "--host", args.host, "--port", str(args.port)], env, children)
        _wait_ready(f"http://{_local(args.host)}:{args.port}/readyz", redis.url, children, args.ready_timeout)
        public = env["STAR_PUBLIC_BASE_URL"].rstrip("/")
        print(f"STAR is serving at {public} (docs: {public}/docs)", flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        failed = next(child for child in children if child.poll() is not None)
        print(f"star serve: {_label(failed)} exited with {failed.returncode}; stopping",
              file=sys.stderr)
        code = 1
    except _Stop:
        pass
    except RuntimeError as exc:
        print(f"star serve: {exc}", file=sys.stderr)
        code = 1
    finally:
        for sig in old_handlers:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
        _stop_children(children, args.stop_timeout)
        redis.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return code
