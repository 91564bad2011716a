"""`python -m bench.redis_trips`: Redis round trips, commands and CPU time per job, API side and
worker side.

    python -m bench.redis_trips --jobs 200 --max-batch 1,8 --json

A private Redis, the API in-process (FastAPI's TestClient) and the worker's own loop in burst mode
(`worker.main.run`, noop model) in this process. Every redis-py request to the server is counted
(one per command, one per pipeline: a round trip), and Redis's INFO commandstats gives the
commands it ran; CPU is this process's (the Redis server's is not in it), less sensitive than
wall time to other processes sharing the machine. Phases: `--jobs` POST /generate, then the worker runs them all (with each
`--max-batch`), then one GET /jobs/{id} per job. It runs against whatever tree is first on
sys.path (PYTHONPATH), so the same script measures an older commit.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis
from redis.connection import Connection

from bench.common import emit, machine_info


class Trips:
    """Counts Connection.send_packed_command calls: one per command or pipeline sent."""

    def __init__(self) -> None:
        self.count = 0
        self.original = original = Connection.send_packed_command

        def counted(conn, command, check_health=True):
            self.count += 1
            return original(conn, command, check_health)
        Connection.send_packed_command = counted   # type: ignore[method-assign]

    def stop(self) -> None:
        Connection.send_packed_command = self.original   # type: ignore[method-assign]


def commands(conn: redis.Redis) -> int:
    stats = conn.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))


def worker_settings(**values):
    try:
        from worker.settings import WorkerSettings
    except ImportError:   # before the settings moved
        from app.settings import WorkerSettings  # type: ignore[no-redef]
    return WorkerSettings(**values)


def publish_entry(conn: redis.Redis, model: str, size: int) -> None:
    try:
        from app.jobs.rq_adapter import queue_name
        from app.jobs.workers import WorkerEntry, publish_worker
    except ImportError:   # before app/jobs
        from app.queue import WorkerEntry, publish_worker, queue_name  # type: ignore[no-redef]
    publish_worker(conn, WorkerEntry(name="bench", model=model, state="ready", size=size, queue=queue_name(model)),
                   ttl_s=600)


def run_phase(jobs: int, max_batch: int, trips: Trips, workdir: Path) -> dict:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.redis_server import RedisServer
    from app.settings import ApiSettings
    from worker.main import run
    from worker.noop import NoopPipeline

    server = RedisServer(appendonly=False, data_dir=workdir / "redis").start()
    try:
        conn = redis.Redis.from_url(server.url)
        publish_entry(conn, "noop-64", 64)
        api = ApiSettings(redis_url=server.url, storage_dir=workdir / "images", queue_limit=10 * jobs + 10)
        with TestClient(create_app(api)) as client:
            client.get("/healthz")
            t0, c0, cpu0 = trips.count, commands(conn), time.process_time()
            ids = [client.post("/generate", json={"prompt": f"job {i}", "seed": i}).json()["id"] for i in range(jobs)]
            post = (trips.count - t0, commands(conn) - c0)
            post_cpu = time.process_time() - cpu0
            settings = worker_settings(redis_url=server.url, storage_dir=workdir / "images", max_batch=max_batch,
                                       max_wait_ms=0, metrics_port=0, warmup=False, name="bench-worker",
                                       heartbeat_s=60, worker_deadline_s=120)
            pipeline = NoopPipeline.from_spec("noop:64")
            t0, c0, cpu0, wall0 = trips.count, commands(conn), time.process_time(), time.perf_counter()
            run(settings, pipeline=pipeline, burst=True)
            work = (trips.count - t0, commands(conn) - c0)
            work_cpu, work_wall = time.process_time() - cpu0, time.perf_counter() - wall0
            t0, c0 = trips.count, commands(conn)
            views = [client.get(f"/jobs/{job_id}").json() for job_id in ids]
            read = (trips.count - t0, commands(conn) - c0)
        succeeded = sum(v["status"] == "succeeded" for v in views)
    finally:
        server.stop()
    return {"kind": "redis_trips", "jobs": jobs, "max_batch": max_batch, "succeeded": succeeded,
            "post_round_trips_per_job": post[0] / jobs, "post_commands_per_job": post[1] / jobs,
            "worker_round_trips_per_job": work[0] / jobs, "worker_commands_per_job": work[1] / jobs,
            "post_cpu_ms_per_job": round(1000 * post_cpu / jobs, 3),
            "worker_cpu_ms_per_job": round(1000 * work_cpu / jobs, 3), "worker_wall_ms_per_job": round(1000 * work_wall / jobs, 3),
            "read_round_trips_per_job": read[0] / jobs, "read_commands_per_job": read[1] / jobs,
            "tree": str(Path(sys.modules["app"].__file__).resolve().parents[1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.redis_trips", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--max-batch", default="1,8", help="comma list: one worker run per value")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    trips = Trips()
    out = open(args.out, "a", encoding="utf-8") if args.out else None
    emit({"kind": "machine", **machine_info()}, args.json)
    try:
        for max_batch in (int(b) for b in args.max_batch.split(",")):
            with tempfile.TemporaryDirectory(prefix="star-bench-trips-") as tmp:
                record = run_phase(args.jobs, max_batch, trips, Path(tmp))
            emit(record, args.json)
            if out:
                emit(record, True, out)
    finally:
        trips.stop()
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
