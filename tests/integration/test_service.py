"""End to end with a real Redis, the API under uvicorn and a `python -m worker` subprocess running
the real `tiny` model (256 px, random weights, CPU float32)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.redis_server import free_port

MAX_WAIT_MS = 300


@pytest.fixture(scope="module")
def service(new_redis_db, tmp_path_factory, worker_process, api_server):
    from app.settings import ApiSettings

    redis_url, data = new_redis_db(), tmp_path_factory.mktemp("service")
    metrics_port = free_port()
    worker = worker_process(redis_url, data / "images", data / "worker.log", env={
        "STAR_MODEL": "tiny", "STAR_MAX_BATCH": "8", "STAR_MAX_WAIT_MS": str(MAX_WAIT_MS),
        "STAR_METRICS_PORT": str(metrics_port)})
    with worker:
        settings = ApiSettings(redis_url=redis_url, storage_dir=data / "images")
        with api_server(settings) as api:
            api.redis_url, api.worker, api.metrics_url = redis_url, worker, f"http://127.0.0.1:{metrics_port}/metrics"
            yield api


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/jobs/{job_id}").json()
        if view["status"] not in ("queued", "running"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {view['status']} after {timeout}s")


def pixels(client: httpx.Client, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)))


def metric(text: str, name: str, labels: dict | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or labels.items() <= sample.labels.items()):
                return sample.value
    raise KeyError(name)


def test_generate_poll_and_fetch_the_png(service):
    client = service.client
    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "n": 2, "seed": 1234, "top_k": 50}
    accepted = client.post("/generate", json=body)
    assert accepted.status_code == 202
    assert accepted.headers["location"] == f"{service.url}/jobs/{accepted.json()['id']}"
    view = wait_done(client, accepted.json()["id"])
    assert view["status"] == "succeeded", view
    assert view["model"] == "tiny" and view["request"]["size"] == 256
    timings = view["timings"]
    assert timings["queue_wait_s"] >= 0 and timings["model_s"] > 0 and timings["total_s"] >= timings["model_s"]
    assert [(i["seed"], i["width"], i["height"]) for i in view["images"]] == [(1234, 256, 256), (1235, 256, 256)]
    for i, image in enumerate(view["images"]):
        response = client.get(image["url"])
        assert response.headers["content-type"] == "image/png"
        assert "immutable" in response.headers["cache-control"] and response.headers["etag"]
        png = Image.open(io.BytesIO(response.content))
        assert png.size == (256, 256) and png.mode == "RGB"
        assert png.text["prompt"] == body["prompt"] and png.text["negative_prompt"] == "fog"
        assert png.text["seed"] == str(1234 + i) and png.text["model"] == "tiny" and png.text["top_k"] == "50"
        parameters = json.loads(png.text["parameters"])
        assert parameters == {"prompt": body["prompt"], "negative_prompt": "fog", "seed": 1234 + i, "size": 256,
                              "guidance_scale": 4.0, "top_k": 50, "top_p": 0.8, "temperature": 1.0,
                              "sampler": "plain", "model": "tiny"}   # sampler auto: tiny has no head
    assert not np.array_equal(pixels(client, view["images"][0]["url"]), pixels(client, view["images"][1]["url"]))


def test_concurrent_requests_are_batched_and_each_matches_its_solo_run(service):
    client = service.client
    bodies = [{"prompt": f"a watercolor of island number {i}", "seed": 100 + i,
               "guidance_scale": 2.0 + i / 2, "top_p": 0.9 - i / 20} for i in range(8)]
    calls_before = metric(httpx.get(service.metrics_url).text, "star_worker_batches_total")
    with ThreadPoolExecutor(8) as pool:
        accepted = list(pool.map(lambda b: httpx.post(f"{service.url}/generate", json=b, timeout=30), bodies))
    assert all(a.status_code == 202 for a in accepted)
    batched = [wait_done(client, a.json()["id"]) for a in accepted]
    assert all(v["status"] == "succeeded" for v in batched)
    calls = metric(httpx.get(service.metrics_url).text, "star_worker_batches_total") - calls_before
    assert 1 <= calls < len(bodies), f"{calls} model calls for {len(bodies)} requests"

    for body, view in zip(bodies, batched):   # the same request alone gives the same pixels
        solo = wait_done(client, client.post("/generate", json=body).json()["id"])
        assert solo["status"] == "succeeded"
        assert np.array_equal(pixels(client, view["images"][0]["url"]), pixels(client, solo["images"][0]["url"])), body
    first, second = (pixels(client, v["images"][0]["url"]) for v in batched[:2])
    assert np.count_nonzero(first != second) > 0.5 * first.size   # different requests, different images
    metrics = httpx.get(service.metrics_url).text
    assert metric(metrics, "star_worker_batches_total") - calls_before == calls + len(bodies)
    assert metric(metrics, "star_worker_batch_jobs_count") >= calls + len(bodies)
    assert metric(metrics, "star_worker_state", {"star_worker_state": "ready"}) == 1


def test_every_reported_seed_reproduces_its_image_alone_even_past_the_largest_seed(service):
    """Image i of (seed, n) uses (seed + i) mod 2^32: the seeds reported wrap past 4294967295 and each
    one, posted back with n=1, gives that image's pixels."""
    client = service.client
    body = {"prompt": "a red kite over the sea", "seed": 4294967294, "n": 3}
    view = wait_done(client, client.post("/generate", json=body).json()["id"])
    assert view["status"] == "succeeded", view
    assert [i["seed"] for i in view["images"]] == [4294967294, 4294967295, 0]
    for image in view["images"]:
        png = Image.open(io.BytesIO(client.get(image["url"]).content))
        assert png.text["seed"] == str(image["seed"]) and json.loads(png.text["parameters"])["seed"] == image["seed"]
        again = client.post("/generate", json={**body, "seed": image["seed"], "n": 1})
        assert again.status_code == 202, again.text
        alone = wait_done(client, again.json()["id"])
        assert np.array_equal(pixels(client, image["url"]), pixels(client, alone["images"][0]["url"])), image["seed"]
    first, last = (pixels(client, view["images"][k]["url"]) for k in (0, 2))
    assert np.count_nonzero(first != last) > 0.5 * first.size   # different seeds, different images (control)


def test_invalid_and_unknown(service):
    client = service.client
    error = client.post("/generate", json={"prompt": "x", "size": 1024}).json()["error"]
    assert error["code"] == "size_not_served" and error["field"] == "size" and "256" in error["message"]
    error = client.post("/generate", json={"prompt": "x", "n": 9}).json()["error"]
    assert error["field"] == "n" and "from 1 to 4" in error["message"]
    assert client.get("/jobs/00000000-0000-4000-8000-000000000000").status_code == 404


def test_service_routes_report_the_live_worker(service):
    client = service.client
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["models"] == ["tiny"]
    models = client.get("/models").json()
    assert models["sizes"] == [256] and models["default_size"] == 256
    assert models["models"][0]["name"] == "tiny" and models["models"][0]["max_batch"] == 8
    metrics = client.get("/metrics").text
    assert metric(metrics, "star_job_latency_seconds_count", {"model": "tiny", "status": "succeeded"}) >= 1
    assert metric(metrics, "star_job_queue_wait_seconds_count", {"model": "tiny"}) >= 1
    assert metric(metrics, "star_queue_depth", {"model": "tiny"}) == 0
    assert metric(metrics, "star_workers", {"model": "tiny", "state": "ready"}) == 1


def test_rq_info_shows_the_queue_and_the_worker(service):
    out = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", service.redis_url, "-S", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    queue_line = next(line for line in out.stdout.splitlines() if line.startswith("star-tiny"))
    finished = int(queue_line.split(" executing, ")[1].split(" finished")[0])
    assert finished >= 17 and "0 failed" in queue_line
    worker_line = next(line for line in out.stdout.splitlines() if line.startswith(service.worker.name))
    assert "idle" in worker_line and "star-tiny" in worker_line
