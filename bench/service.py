"""`python -m bench.service`: the service over HTTP on this machine, with a no-op model and `tiny`.

    python -m bench.service --requests 2000 --concurrency 64 --json

For each model it starts a private Redis (app.redis_server), the API (`python -m app.cli api`) and
one worker (`python -m app.cli worker`) as separate processes, waits for /readyz, then:
  load        `--requests` POST /generate from `--concurrency` concurrent clients (asyncio, one
              keep-alive connection each): POST throughput and the submit latency (POST sent to
              202 received); then waits for every job and reads its server-side timings:
              end-to-end (queued -> finished) and model time, completion throughput.
              Closed loop by default (each client sends its next POST when the last is answered:
              the most the service takes, and latency = clients / throughput by Little's law);
              `--rate R` makes it open loop: POST i is due at i/R seconds, sent by whichever
              client is free, and its latency counts from when it was due (a late send counts)
  sequential  `--sequential` jobs one after another (nothing else queued): client end-to-end
              (POST sent -> GET shows it finished, polled every millisecond) and the service
              overhead per job = end-to-end - the job's model time (also server-side:
              queued -> finished - model time)
The worker's batching window (STAR_MAX_WAIT_MS, a latency/throughput trade-off you choose) is
`--max-wait-ms`, 0 by default, so the overhead is what the service adds, not a chosen wait.
Settings of the caller's environment (STAR_*) are not passed on: the run is self-contained.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, machine_info

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"succeeded", "failed", "canceled", "expired"}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="POSTs of the load phase (noop)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients of the load phase")
    ap.add_argument("--sequential", type=int, default=50, help="one-at-a-time jobs for the overhead (noop)")
    ap.add_argument("--models", default="noop,tiny", help="comma list of STAR_MODEL values")
    ap.add_argument("--tiny-requests", type=int, default=32, help="POSTs of the load phase for real models")
    ap.add_argument("--tiny-sequential", type=int, default=5, help="sequential jobs for real models")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open loop: offer this many POSTs per second in all (default 0: closed loop)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=int, default=0)
    ap.add_argument("--worker-threads", type=int, default=1, help="OMP/torch threads of the worker")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all jobs of a phase")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--plot", default=None, help="write a PNG plot of the latency percentiles per model")
    return ap.parse_args(argv)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None where unknown."""
    try:
        fields = open(f"/proc/{pid}/stat", encoding="ascii").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    i = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[i]


class Service:
    """Redis + API + one worker as child processes; stopped in reverse order."""

    def __init__(self, model: str, args, workdir: Path):
        self.model, self.args, self.workdir = model, args, workdir
        self.children: list[subprocess.Popen] = []

    def __enter__(self) -> "Service":
        from app.redis_server import RedisServer, free_port

        self.redis = RedisServer(data_dir=self.workdir / "redis", appendonly=False).start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STAR_")}
        env.update({"STAR_REDIS_URL": self.redis.url, "STAR_STORAGE_DIR": str(self.workdir / "images"),
                    "STAR_PUBLIC_BASE_URL": self.url, "STAR_LOG_LEVEL": "WARNING",
                    "STAR_QUEUE_LIMIT": str(10 * self.args.requests + 1000), "STAR_MODEL": self.model,
                    "STAR_MAX_BATCH": str(self.args.max_batch), "STAR_MAX_WAIT_MS": str(self.args.max_wait_ms),
                    "STAR_METRICS_PORT": "0", "STAR_HEARTBEAT_S": "1", "STAR_DEVICE": "cpu",
                    "OMP_NUM_THREADS": str(self.args.worker_threads), "PYTHONPATH": str(ROOT)})
        log = open(self.workdir / f"{self.model.replace(':', '_')}.log", "ab")
        star = [sys.executable, "-m", "app.cli"]
        self.children.append(subprocess.Popen(star + ["worker"], env=env, cwd=ROOT, stdout=log,
                                              stderr=subprocess.STDOUT))
        self.children.append(subprocess.Popen(star + ["api", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        self._wait_ready(180.0)
        self.pids = {"worker": self.children[0].pid, "api": self.children[1].pid, "redis": self.redis.process.pid,
                     "bench_client": os.getpid()}
        return self

    def cpu(self) -> dict[str, float | None]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in self.children:
                if child.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"{child.args[3:]} exited with {child.returncode}; see {self.workdir}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the service was not ready within {timeout:.0f}s")

    def __exit__(self, *exc) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
        for child in reversed(self.children):
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children.clear()
        self.redis.stop()


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the load generator shares the
    machine with the service, so it should cost as little CPU as possible (httpx costs ~2 ms of
    CPU per request here, about what the API itself spends)."""

    def __init__(self, url: str):
        host_port = url.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        self.writer.write(head + data)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, (json.loads(payload) if payload.startswith(b"{") else {})

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load_phase(url: str, n: int, concurrency: int, rate: float = 0.0) -> dict:
    """n POSTs from `concurrency` clients, back to back (rate 0) or POST i due at start + i/rate;
    submit latencies (from the send, or from the due time when paced), status counts, job ids."""
    latencies, statuses, ids = [], {}, []
    counter = iter(range(n))
    start = time.perf_counter()

    async def client() -> None:
        conn = Connection(url)
        try:
            for i in counter:
                body = {"prompt": f"benchmark request {i}: a red fox in the snow", "seed": i}
                t0 = time.perf_counter()
                if rate > 0:
                    due = start + i / rate
                    if due > t0:
                        await asyncio.sleep(due - t0)
                    t0 = due
                status, rec = await conn.request("POST", "/generate", body)
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 202:
                    ids.append(rec["id"])
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "latencies": latencies, "statuses": statuses, "ids": ids, "t0": start}


async def wait_all(url: str, ids: list[str], timeout: float) -> dict[str, dict]:
    """Poll GET /jobs/{id} until every job is finished; the final records."""
    import httpx

    done: dict[str, dict] = {}
    pending = list(ids)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=16)) as http:
        while pending and time.monotonic() < deadline:
            sem = asyncio.Semaphore(16)

            async def get(job_id: str) -> None:
                async with sem:
                    rec = (await http.get(f"/jobs/{job_id}")).json()
                    if rec.get("status") in TERMINAL:
                        done[job_id] = rec

            await asyncio.gather(*(get(j) for j in pending))
            pending = [j for j in pending if j not in done]
            if pending:
                await asyncio.sleep(0.2)
    return done


async def sequential_phase(url: str, n: int, timeout: float) -> list[dict]:
    """n jobs one at a time: client end-to-end, server total and model time of each."""
    out = []
    conn = Connection(url)
    try:
        for i in range(n):
            t0 = time.perf_counter()
            _, accepted = await conn.request("POST", "/generate", {"prompt": f"sequential {i}", "seed": i})
            job_id = accepted["id"]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                _, rec = await conn.request("GET", f"/jobs/{job_id}")
                if rec.get("status") in TERMINAL:
                    break
                await asyncio.sleep(0.001)
            e2e = time.perf_counter() - t0
            t = rec.get("timings") or {}
            out.append({"status": rec.get("status"), "e2e_s": e2e, "model_s": t.get("model_s") or 0.0,
                        "total_s": t.get("total_s")})
    finally:
        await conn.close()
    return out


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def run_model(model: str, args, workdir: Path) -> dict:
    real = not model.startswith("noop")
    n = args.tiny_requests if real else args.requests
    n_seq = args.tiny_sequential if real else args.sequential
    with Service(model, args, workdir) as svc:
        loop = asyncio.new_event_loop()
        try:
            cpu0 = svc.cpu()
            load = loop.run_until_complete(load_phase(svc.url, n, args.concurrency, args.rate))
            cpu1 = svc.cpu()
            t_submitted = time.perf_counter()
            records = loop.run_until_complete(wait_all(svc.url, load["ids"], args.timeout))
            t_done = time.perf_counter()
            seq = loop.run_until_complete(sequential_phase(svc.url, n_seq, args.timeout))
        finally:
            loop.close()
    timings = [r.get("timings") or {} for r in records.values()]
    totals = [t["total_s"] for t in timings if t.get("total_s") is not None]
    models = [t.get("model_s") or 0.0 for t in timings]
    overhead_load = [t["total_s"] - (t.get("model_s") or 0.0) for t in timings if t.get("total_s") is not None]
    seq_ok = [s for s in seq if s["status"] == "succeeded"]
    seq_overhead = [s["e2e_s"] - s["model_s"] for s in seq_ok]
    seq_server = [s["total_s"] - s["model_s"] for s in seq_ok if s["total_s"] is not None]
    lat = load["latencies"]
    return {
        "kind": "service", "model": model, "requests": n, "concurrency": args.concurrency,
        "offered_per_s": args.rate or None,   # None: closed loop
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "post_per_s": len(lat) / load["wall_s"], "post_wall_s": load["wall_s"],
        "submit_p50_ms": ms(pct(lat, 50)), "submit_p90_ms": ms(pct(lat, 90)), "submit_p99_ms": ms(pct(lat, 99)),
        "submit_max_ms": ms(max(lat, default=None)),
        "statuses": {str(k): v for k, v in sorted(load["statuses"].items())},
        "cpu_s_during_posts": {k: None if cpu0[k] is None or cpu1[k] is None else round(cpu1[k] - cpu0[k], 2)
                               for k in cpu0},
        "completed": len(records), "succeeded": sum(r.get("status") == "succeeded" for r in records.values()),
        "complete_per_s": len(records) / max(t_done - load["t0"], 1e-9), "drain_after_submit_s": t_done - t_submitted,
        "e2e_p50_ms": ms(pct(totals, 50)), "e2e_p90_ms": ms(pct(totals, 90)), "e2e_p99_ms": ms(pct(totals, 99)),
        "model_p50_ms": ms(pct(models, 50)), "overhead_under_load_p50_ms": ms(pct(overhead_load, 50)),
        "sequential_jobs": len(seq), "sequential_e2e_p50_ms": ms(pct([s["e2e_s"] for s in seq_ok], 50)),
        "sequential_model_p50_ms": ms(pct([s["model_s"] for s in seq_ok], 50)),
        "overhead_p50_ms": ms(pct(seq_overhead, 50)), "overhead_p99_ms": ms(pct(seq_overhead, 99)),
        "server_overhead_p50_ms": ms(pct(seq_server, 50)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out_file = open(args.out, "a", encoding="utf-8") if args.out else None
    emit({"kind": "machine", **machine_info()}, args.json)
    records = []
    with tempfile.TemporaryDirectory(prefix="star-bench-service-") as tmp:
        for model in [m for m in args.models.split(",") if m]:
            workdir = Path(tmp) / model.replace(":", "_")
            workdir.mkdir()
            rec = run_model(model, args, workdir)
            records.append(rec)
            emit(rec, args.json)
            if out_file:
                emit(rec, True, out_file)
    if out_file:
        out_file.close()
    if args.plot and records:
        plot(args.plot, records)
    return 0


def plot(path: str, records: list[dict]) -> str:
    from bench.plot import line_panels

    def series(prefix: str) -> dict:
        return {r["model"]: [(q, r[f"{prefix}_p{q}_ms"]) for q in (50, 90, 99)] for r in records}

    r0 = records[0]
    return line_panels(path, f"bench.service {r0['requests']} requests, {r0['concurrency']} clients", [
        {"title": "submit latency (ms)", "x_label": "percentile", "series": series("submit")},
        {"title": "end-to-end latency (ms)", "x_label": "percentile", "series": series("e2e")},
    ])


if __name__ == "__main__":
    sys.exit(main())
