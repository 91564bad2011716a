"""End to end with images in S3 (STAR_STORAGE_URL): a real Redis, the API under uvicorn, worker
subprocesses (the noop pipeline) and an S3-compatible server (moto_server on loopback): the job's
image URLs fetch the PNGs (presigned, or through the API's 307), images a worker stored for a job
taken away from it are deleted, and a worker that cannot write to the store refuses to start."""
from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from PIL import Image

from app.jobs.workers import live_workers
from app.signing import UrlSigner
from app.storage import new_image_id
from client import StarClient

ROOT = Path(__file__).resolve().parents[2]
FAULTY_WORKER = str(ROOT / "tests/reliability/faulty_worker.py")
WORKER = {"STAR_MODEL": "noop:64", "STAR_WARMUP": "false", "STAR_MAX_WAIT_MS": "100", "STAR_HEARTBEAT_S": "0.3",
          "STAR_WORKER_DEADLINE_S": "1.5"}
SIGNING_KEY = "s3-test-signing-key-0123456789abcdef"


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/jobs/{job_id}").json()
        if view["status"] not in ("queued", "running"):
            return view
        assert time.monotonic() < deadline, f"job {job_id} still {view['status']} after {timeout}s"
        time.sleep(0.05)


def generate(client: httpx.Client, prompt: str, **body) -> dict:
    accepted = client.post("/generate", json={"prompt": prompt, **body})
    assert accepted.status_code == 202, accepted.text
    view = wait_done(client, accepted.json()["id"])
    assert view["status"] == "succeeded", view
    return view


def png_prompt(content: bytes) -> str:
    image = Image.open(io.BytesIO(content))
    assert image.format == "PNG" and image.size == (64, 64)
    return image.text["prompt"]


@pytest.fixture
def s3_stack(s3_server, s3_bucket, redis_url, tmp_path, worker_process, api_server):
    """`stack(worker_env=None, **api_overrides)` -> (api, worker): images in s3://BUCKET/images."""
    from app.settings import ApiSettings

    opened: list = []

    def start_worker(name: str, script: list[str] | None = None, **env):
        worker = worker_process(redis_url, tmp_path / "images", tmp_path / f"{name}.log", name=f"{name}-{time.monotonic_ns()}",
                                env={**WORKER, "STAR_STORAGE_URL": f"s3://{s3_bucket}/images", **env},
                                **({"script": script} if script else {}))
        opened.append(worker)
        return worker.start()

    def stack(**api_overrides):
        # the workers' deadline, and the API's reaper as often as theirs: it holds the reaper lock
        # for STAR_REAPER_S at a time, so its default (10 s) would keep theirs out
        settings = ApiSettings(redis_url=redis_url, storage_dir=tmp_path / "images",
                               storage_url=f"s3://{s3_bucket}/images", worker_deadline_s=1.5, reaper_s=0.3,
                               **api_overrides)
        api = api_server(settings).__enter__()
        opened.append(api)
        return api, start_worker

    yield stack
    for item in reversed(opened):
        if hasattr(item, "server"):
            item.__exit__(None, None, None)
        else:
            item.stop(timeout=10)


def test_presigned_urls_fetch_the_pngs_from_the_store(s3_stack, s3_server, s3_bucket, tmp_path):
    api, start_worker = s3_stack(url_ttl_s=1800)
    start_worker("w")
    view = generate(api.client, "a lighthouse in the store", n=2, seed=5)
    ids = [urlsplit(i["url"]).path.rsplit("/", 1)[1].removesuffix(".png") for i in view["images"]]
    assert s3_server.keys(s3_bucket) == sorted(f"images/{i}.png" for i in ids)
    assert not list((tmp_path / "images").rglob("*.png"))   # nothing on the local disk
    for image in view["images"]:
        assert image["url"].startswith(f"{s3_server.url}/{s3_bucket}/images/") and "X-Amz-Expires=1800" in image["url"]
        response = httpx.get(image["url"])   # straight from the store: the API serves no bytes
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert png_prompt(response.content) == "a lighthouse in the store"
    # The API's own image route redirects to the store, and the OpenAI route reads from it.
    via_api = api.client.get(f"/images/{ids[0]}.png")
    assert via_api.status_code == 307 and via_api.headers["location"].startswith(f"{s3_server.url}/{s3_bucket}/")
    assert api.client.get(f"/images/{new_image_id()}.png").status_code == 404
    openai = api.client.post("/v1/images/generations", json={"prompt": "a buoy", "response_format": "b64_json"})
    assert openai.status_code == 200, openai.text
    assert png_prompt(base64.b64decode(openai.json()["data"][0]["b64_json"])) == "a buoy"
    with StarClient(api.url) as client:
        assert png_prompt(client.generate("a client's buoy", timeout=60).images[0].png) == "a client's buoy"


def test_signed_api_urls_redirect_to_a_short_lived_presigned_url(s3_stack, s3_server):
    api, start_worker = s3_stack(url_signing_key=SIGNING_KEY, s3_redirect_ttl_s=120)
    start_worker("w")
    view = generate(api.client, "a signed harbour")
    (url,) = [i["url"] for i in view["images"]]
    assert url.startswith(f"{api.url}/images/") and "expires=" in url and "sig=" in url
    first = httpx.get(url)
    assert first.status_code == 307 and first.headers["cache-control"] == "no-store"
    target = first.headers["location"]
    assert target.startswith(s3_server.url) and "X-Amz-Expires=120" in target
    assert png_prompt(httpx.get(url, follow_redirects=True).content) == "a signed harbour"
    with StarClient(api.url) as client:   # the Python client (and `star generate`) follow the redirect
        assert png_prompt(client.generate("a client's harbour", timeout=60).images[0].png) == "a client's harbour"
    forged = httpx.get(url.replace("sig=", "sig=x"))
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "forbidden"
    unknown = new_image_id()
    signed_unknown = f"{api.url}/images/{unknown}.png?{UrlSigner(SIGNING_KEY, 3600).query(unknown)}"
    assert httpx.get(signed_unknown).status_code == 404


def test_images_stored_for_a_job_taken_away_are_deleted(s3_stack, s3_server, s3_bucket):
    """A worker stops right after storing a job's PNGs (SIGSTOP, as a stalled node): presumed dead,
    its job re-runs on another worker; back, it finds the job taken and deletes its own PNGs."""
    api, start_worker = s3_stack()
    stalled = start_worker("stalled", script=[FAULTY_WORKER], TEST_STOP_AFTER_STORE="1")
    job = api.client.post("/generate", json={"prompt": "a job run twice", "n": 2}).json()["id"]
    wait_for_text(stalled, "stored 2 images; stopping")
    assert len(s3_server.keys(s3_bucket)) == 2
    try:
        rescuer = start_worker("rescuer")
        try:
            view = wait_done(api.client, job)
        except AssertionError as exc:   # say where the job got stuck
            raise AssertionError(f"{exc}\nstalled:\n{stalled.tail(30)}\nrescuer:\n{rescuer.tail(30)}") from None
        assert view["status"] == "succeeded", view
    finally:
        os.kill(stalled.process.pid, signal.SIGCONT)
    wait_for_text(stalled, "re-queued away from this worker")
    kept = sorted(f"images/{urlsplit(i['url']).path.rsplit('/', 1)[1]}" for i in view["images"])
    deadline = time.monotonic() + 30
    while s3_server.keys(s3_bucket) != kept:   # the stalled worker's 2 are deleted, the rescuer's stay
        assert time.monotonic() < deadline, s3_server.keys(s3_bucket)
        time.sleep(0.1)


def wait_for_text(worker, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.tail(200):
        assert time.monotonic() < deadline, f"{text!r} not in the worker's log:\n{worker.tail()}"
        time.sleep(0.05)


@pytest.mark.parametrize("store, message", [
    ("missing bucket", "the bucket does not exist: create it, or fix the bucket in STAR_STORAGE_URL"),
    ("wrong secret", "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY"),
])
def test_a_worker_that_cannot_write_to_the_store_exits_at_start_and_never_registers(
        store, message, s3_server, s3_auth_server, aws_env, redis_url):
    server = s3_auth_server if store == "wrong secret" else s3_server
    env = {**os.environ, **server.env(), "STAR_REDIS_URL": redis_url, "STAR_METRICS_PORT": "0", **WORKER,
           "STAR_STORAGE_URL": "s3://no-such-bucket/images" if store == "missing bucket" else "s3://star-auth/images"}
    if store == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    done = subprocess.run([sys.executable, "-m", "worker"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "image storage s3://" in done.stderr
    assert "Traceback" not in done.stderr
    assert live_workers(redis.Redis.from_url(redis_url)) == []
