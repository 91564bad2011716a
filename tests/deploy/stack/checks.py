"""The checks of `make test-deploy` against a running Compose stack (tests/deploy/stack/run.sh), all
through what a user reaches: the public port (nginx in front of the API replicas), Prometheus on
127.0.0.1, and `docker compose` itself. Standard library only.

Environment: STACK_URL (public base URL), PROMETHEUS_URL, STACK_COMPOSE (the `docker compose ...`
command line of the stack, project and files included).
"""
from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from datetime import datetime

URL = os.environ["STACK_URL"].rstrip("/")
PROMETHEUS = os.environ["PROMETHEUS_URL"].rstrip("/")
COMPOSE = shlex.split(os.environ["STACK_COMPOSE"])
PROMPT = "a red circle on a blue background"   # a prompt the shapes model draws
DRAIN_JOBS = 12


def http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str) -> tuple[int, object]:
    status, _, body = http("GET", url)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def wait_for(what: str, predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError as exc:   # connection refused or reset while services start
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def compose(*args: str, timeout: float = 300) -> str:
    result = subprocess.run([*COMPOSE, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker compose {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def submit(seed: int, n: int = 1) -> str:
    status, headers, body = http("POST", f"{URL}/generate", {"prompt": PROMPT, "seed": seed, "n": n})
    assert status == 202, (status, body)
    return json.loads(body)["id"]


def job(job_id: str) -> dict:
    status, record = get_json(f"{URL}/jobs/{job_id}")
    assert status == 200, (status, record)
    return record


def finished(job_id: str, timeout: float = 180) -> dict:
    return wait_for(f"job {job_id} to finish", lambda: (lambda r: r if r["status"] not in
                    ("queued", "running") else None)(job(job_id)), timeout, interval=0.5)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def timestamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# ----------------------------------------------------------------------------------- the checks

def check_readyz() -> None:
    def ready():
        status, body = get_json(f"{URL}/readyz")
        return status == 200 and body
    body = wait_for("/readyz to answer 200 through the proxy", ready, timeout=420, interval=2)
    assert body["workers"] == 1 and body["models"] == ["shapes"], body


def check_generate_and_image() -> None:
    record = finished(submit(seed=7))
    assert record["status"] == "succeeded", record
    (image,) = record["images"]
    assert image["url"].startswith(URL + "/images/"), image["url"]
    status, headers, data = http("GET", image["url"])
    assert status == 200 and headers["Content-Type"] == "image/png", (status, headers)
    assert png_size(data) == (image["width"], image["height"]) == (128, 128)


def targets_up(expected: dict[str, int]):
    status, body = get_json(f"{PROMETHEUS}/api/v1/targets")
    if status != 200:
        return None
    up: dict[str, int] = {}
    for target in body["data"]["activeTargets"]:
        if target["health"] == "up":
            up[target["labels"]["job"]] = up.get(target["labels"]["job"], 0) + 1
    return up if all(up.get(job, 0) == count for job, count in expected.items()) else None


def check_prometheus_targets() -> None:
    expected = {"star-api": 2, "star-worker": 1, "prometheus": 1}
    wait_for(f"Prometheus targets up: {expected}", lambda: targets_up(expected), timeout=180, interval=3)


def check_scale_to_two_workers() -> None:
    compose("up", "-d", "--no-build", "--scale", "worker-0=2", "worker-0")
    wait_for("/readyz to count 2 workers", lambda: (lambda s, b: s == 200 and b["workers"] == 2)(
        *get_json(f"{URL}/readyz")), timeout=420, interval=2)
    expected = {"star-api": 2, "star-worker": 2}
    wait_for(f"Prometheus targets up: {expected}", lambda: targets_up(expected), timeout=180, interval=3)


def check_stop_drains_the_workers() -> None:
    """`docker compose stop` sends SIGTERM: each worker finishes the job it runs, then exits 0; jobs
    it had not started stay queued."""
    ids = [submit(seed=100 + i, n=4) for i in range(DRAIN_JOBS)]
    wait_for("a job to be running", lambda: any(job(i)["status"] == "running" for i in ids), 120, 0.1)
    stop_at = time.time()
    compose("stop", "worker-0", timeout=200)
    records = [job(i) for i in ids]
    statuses = [r["status"] for r in records]
    assert set(statuses) <= {"succeeded", "queued"}, statuses
    drained = [r for r in records if r["status"] == "succeeded"
               and timestamp(r["timings"]["started_at"]) < stop_at < timestamp(r["timings"]["finished_at"])]
    assert drained, f"no job was running at the stop and finished after it: {statuses}"
    assert "queued" in statuses, "the workers went on taking jobs after the stop"
    containers = compose("ps", "--all", "--quiet", "worker-0").split()
    assert len(containers) == 2, containers
    codes = subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}", *containers],
                           capture_output=True, text=True, check=True).stdout.split()
    assert codes == ["0", "0"], f"worker exit codes {codes}"


def check_down_removes_everything() -> None:
    compose("down", "-v", "--timeout", "30")
    project = COMPOSE[COMPOSE.index("--project-name") + 1]
    label = f"label=com.docker.compose.project={project}"
    for kind in ("container", "volume", "network"):
        listing = ["docker", kind, "ls", "--quiet", "--filter", label]
        if kind == "container":
            listing.insert(3, "--all")
        left = subprocess.run(listing, capture_output=True, text=True, check=True).stdout.split()
        assert not left, f"{kind}s left after down -v: {left}"


CHECKS = [check_readyz, check_generate_and_image, check_prometheus_targets,
          check_scale_to_two_workers, check_stop_drains_the_workers, check_down_removes_everything]


def main() -> int:
    passed = failed = 0
    for check in CHECKS:
        started = time.monotonic()
        try:
            check()
        except Exception:   # noqa: BLE001 (report every failure, go on only where it makes sense)
            failed += 1
            print(f"FAIL {check.__name__} ({time.monotonic() - started:.0f}s)\n{traceback.format_exc()}",
                  flush=True)
            if check is not check_down_removes_everything:
                break   # later checks build on this one
        else:
            passed += 1
            print(f"ok   {check.__name__} ({time.monotonic() - started:.0f}s)", flush=True)
    print(f"test-deploy: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
