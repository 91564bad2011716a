"""Usage accounting end to end against a real Redis: jobs POSTed through the API (in-process, with
named, plaintext and admin keys), run by the real batching worker (in-process, burst mode) with a
small flat-image pipeline; then each job's usage, GET /usage as each key and the usage metrics."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.jobs import usage
from app.jobs.read import fetch_job
from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker
from model.request import ImageResult
from worker.main import run
from worker.noop import NoopPipeline
from worker.settings import WorkerSettings

KEYS = {"ops": "ops-secret-key-1", "bulk": "bulk-secret-key-2"}
PLAIN = "carol-plaintext-key-3"          # configured as a plaintext key: named key-<hash prefix>
ADMIN = ("boss", "boss-secret-key-4")
MODEL = "noop-64"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {KEYS.get(key, key)}"}


class Flat(NoopPipeline):
    """Flat 64 px images, a millisecond per scale (so a call takes some time); records the calls."""

    def __init__(self):
        super().__init__(64, 0.001)
        self.batches: list[int] = []

    def generate(self, requests, *, on_scale=None):
        self.batches.append(len(requests))
        for k in range(1, len(self.patch_nums) + 1):
            time.sleep(self.scale_s)
            if on_scale:
                on_scale(k, len(self.patch_nums))
        return [ImageResult(np.full((64, 64, 3), 9, np.uint8), False) for _ in requests]


@pytest.fixture
def api(make_api_settings, conn):
    from app.main import create_app

    publish_worker(conn, WorkerEntry(name="registry", model=MODEL, state="ready", size=64,
                                     queue=queue_name(MODEL)), ttl_s=60)
    keys = ",".join([f"{name}:{sha(key)}" for name, key in KEYS.items()] + [PLAIN])
    with TestClient(create_app(make_api_settings(api_keys=keys, admin_api_keys=f"{ADMIN[0]}:{sha(ADMIN[1])}"))) as client:
        yield client


def work(redis_url, tmp_path) -> Flat:
    """Run the real worker until the queue is empty: batches of up to 4 images."""
    pipe = Flat()
    settings = WorkerSettings(redis_url=redis_url, storage_dir=tmp_path / "images", max_batch=4, max_wait_ms=0,
                              metrics_port=0, heartbeat_s=0.2, warmup=False, name="w-usage")
    assert run(settings, pipeline=pipe, burst=True) == 0
    return pipe


def post(api, key: str, n: int) -> str:
    response = api.post("/generate", json={"prompt": "a kite", "n": n}, headers=bearer(key))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_each_job_is_charged_its_share_of_its_batch_and_keys_see_their_own_usage(api, conn, redis_url, tmp_path):
    before = usage.day_of(time.time())
    ops, bulk = post(api, "ops", 1), post(api, "bulk", 3)
    assert work(redis_url, tmp_path).batches == [4]   # one model call for both jobs
    after = usage.day_of(time.time())
    views = {name: api.get(f"/jobs/{job_id}", headers=bearer(name)).json() for name, job_id in
             (("ops", ops), ("bulk", bulk))}
    used = {name: view["usage"] for name, view in views.items()}
    assert {name: (u["jobs"], u["images"], u["pixels"]) for name, u in used.items()} == {
        "ops": (1, 1, 64 * 64), "bulk": (1, 3, 3 * 64 * 64)}
    call_s = views["ops"]["timings"]["model_s"]
    assert call_s == views["bulk"]["timings"]["model_s"] and call_s > 0
    assert used["ops"]["model_s"] == pytest.approx(call_s / 4, abs=1e-4)       # split by images: 1 of 4
    assert used["bulk"]["model_s"] == pytest.approx(3 * call_s / 4, abs=1e-4)  # 3 of 4

    mine = api.get("/usage", headers=bearer("ops")).json()
    assert mine["days"] == 30 and [k["key"] for k in mine["keys"]] == ["ops"]
    (entry,) = mine["keys"]
    assert entry["totals"]["jobs"] == 1 and entry["totals"]["pixels"] == 64 * 64
    assert entry["totals"]["model_s"] == pytest.approx(used["ops"]["model_s"], abs=1e-4)
    assert list(entry["days"]) in ([before], [after]) and list(entry["days"].values()) == [entry["totals"]]
    assert [k["key"] for k in api.get("/usage", headers=bearer("bulk")).json()["keys"]] == ["bulk"]


def test_an_admin_key_sees_every_key_and_others_only_their_own(api, redis_url, tmp_path):
    post(api, "ops", 1), post(api, "bulk", 2), post(api, PLAIN, 1)
    work(redis_url, tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN[1]}"}
    everyone = api.get("/usage", headers=admin).json()["keys"]
    plain_name = f"key-{sha(PLAIN)[:8]}"
    assert [(k["key"], k["totals"]["images"]) for k in everyone] == sorted(
        [("bulk", 2), ("ops", 1), (plain_name, 1)])
    (one,) = api.get("/usage", params={"key": "bulk"}, headers=admin).json()["keys"]
    assert one["key"] == "bulk" and one["totals"]["images"] == 2
    refused = api.get("/usage", params={"key": "bulk"}, headers=bearer("ops"))
    assert refused.status_code == 403 and refused.json()["error"]["field"] == "key"
    assert "STAR_ADMIN_API_KEYS" in refused.json()["error"]["message"]
    assert api.get("/usage", params={"days": 0}, headers=bearer("ops")).status_code == 422
    assert api.get("/usage").status_code == 401


def test_usage_metrics_are_labelled_by_key_name_only_for_named_keys(api, redis_url, tmp_path):
    post(api, "ops", 2), post(api, PLAIN, 1)
    work(redis_url, tmp_path)
    text = api.get("/metrics").text
    assert 'star_usage_images_total{key="ops"} 2.0' in text
    assert 'star_usage_jobs_total{key="ops"} 1.0' in text
    assert f'star_usage_pixels_total{{key="unnamed"}} {64 * 64}.0' in text   # the plaintext key
    assert "key-" not in text and 'star_usage_model_seconds_total{key="ops"}' in text


def test_canceled_jobs_are_not_charged(api, redis_url, tmp_path):
    doomed = post(api, "ops", 2)
    assert api.delete(f"/jobs/{doomed}", headers=bearer("ops")).json()["status"] == "canceled"
    post(api, "ops", 1)
    work(redis_url, tmp_path)
    (entry,) = api.get("/usage", headers=bearer("ops")).json()["keys"]
    assert (entry["totals"]["jobs"], entry["totals"]["images"]) == (1, 1)
    assert api.get(f"/jobs/{doomed}", headers=bearer("ops")).json()["usage"] is None


def test_a_jobs_usage_is_added_once_even_if_its_recording_is_retried(api, conn, redis_url, tmp_path):
    job_id = post(api, "ops", 1)
    work(redis_url, tmp_path)
    job = fetch_job(conn, job_id)
    with conn.pipeline() as pipe:   # what a retried recording of the same success would do
        usage.record(pipe, job, job.meta["usage"])
        pipe.execute()
    (entry,) = usage.read_keys(conn, ["ops"], 1)
    assert (entry.totals.jobs, entry.totals.images) == (1, 1)


def test_without_api_keys_jobs_count_as_anonymous(make_api_settings, conn, redis_url, tmp_path):
    from app.main import create_app

    publish_worker(conn, WorkerEntry(name="registry", model=MODEL, state="ready", size=64,
                                     queue=queue_name(MODEL)), ttl_s=60)
    with TestClient(create_app(make_api_settings())) as client:
        assert client.post("/generate", json={"prompt": "a kite", "n": 2}).status_code == 202
        work(redis_url, tmp_path)
        (entry,) = client.get("/usage").json()["keys"]
    assert entry["key"] == "anonymous" and entry["totals"]["images"] == 2


def test_the_schema_documents_usage(api):
    schema = api.get("/openapi.json").json()
    route = schema["paths"]["/usage"]["get"]
    assert {p["name"] for p in route["parameters"]} == {"days", "key"}
    assert {"401", "403", "422"} <= set(route["responses"])
    assert set(schema["components"]["schemas"]["Usage"]["properties"]) == {"jobs", "images", "pixels", "model_s"}
    assert "usage" in schema["components"]["schemas"]["JobView"]["properties"]


def test_the_python_client_and_star_usage_read_the_report(make_api_settings, conn, redis_url, tmp_path, api_server,
                                                          capsys):
    from app import cli
    from client import StarClient, StarRequestError

    publish_worker(conn, WorkerEntry(name="registry", model=MODEL, state="ready", size=64,
                                     queue=queue_name(MODEL)), ttl_s=60)
    keys = ",".join(f"{name}:{sha(key)}" for name, key in KEYS.items())
    with api_server(make_api_settings(api_keys=keys)) as server:
        with StarClient(server.url, api_key=KEYS["ops"]) as star:
            job_id = star.submit("a kite", n=2).id
            work(redis_url, tmp_path)
            assert star.get(job_id).usage.images == 2 and star.get(job_id).usage.pixels == 2 * 64 * 64
            report = star.usage(days=7)
            assert report.days == 7 and [k.key for k in report.keys] == ["ops"]
            assert report.keys[0].totals.images == 2 and list(report.keys[0].days.values()) == [report.keys[0].totals]
            with pytest.raises(StarRequestError) as refused:
                star.usage(key="bulk")
            assert refused.value.status == 403 and refused.value.field == "key"
        args = cli.build_parser().parse_args(["usage", "--server", server.url, "--api-key", KEYS["ops"], "--days", "7"])
        assert cli.run_usage(args, []) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["KEY", "DAY", "JOBS", "IMAGES", "MEGAPIXELS", "MODEL_S"]
        assert lines[-1].split()[:5] == ["ops", "total", "1", "2", "0.01"]
        args = cli.build_parser().parse_args(["usage", "--server", server.url, "--api-key", KEYS["ops"], "--key",
                                              "bulk"])
        assert cli.run_usage(args, []) == 2 and "403 forbidden" in capsys.readouterr().err
