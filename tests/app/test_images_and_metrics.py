"""Image storage and serving, and the API's Prometheus metrics."""
from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.jobs.finish import record_timings
from app.jobs.keys import TIMINGS_KEY
from app.jobs.submit import enqueue
from app.storage import LocalStorage, is_image_id, new_image_id


@pytest.fixture
def client(make_api_settings):
    from app.main import create_app

    with TestClient(create_app(make_api_settings())) as client:
        yield client


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_image_ids_are_random_and_url_safe():
    ids = {new_image_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_image_id(i) and len(i) >= 22 for i in ids)


def test_local_storage_round_trip(tmp_path):
    storage = LocalStorage(tmp_path, "https://img.example.com/")
    image_id = new_image_id()
    assert storage.put(image_id, b"\x89PNG...") == f"https://img.example.com/images/{image_id}.png"
    assert storage.get(image_id) == b"\x89PNG..."
    assert storage.get(new_image_id()) is None
    with pytest.raises(ValueError):
        storage.path("../../etc/passwd")
    assert storage.get("../secret") is None and storage.open("../secret") is None
    assert not list(tmp_path.rglob(".tmp-*"))


def test_local_storage_survives_its_directories_being_removed(tmp_path):
    """put() remembers the fan-out directories it made; one removed since (a cleanup job) is made again."""
    import shutil

    storage = LocalStorage(tmp_path / "images", "http://x")
    first = new_image_id()
    storage.put(first, b"one")
    shutil.rmtree(tmp_path / "images")
    again = first[:2] + new_image_id()[2:]      # same fan-out directory as the first
    storage.put(again, b"two")
    assert storage.get(again) == b"two" and storage.path(again).parent == storage.path(first).parent


def test_images_are_served_with_type_and_caching_headers(client, make_api_settings):
    settings = make_api_settings()
    image_id = new_image_id()
    LocalStorage(settings.storage_dir, settings.public_base_url).put(image_id, b"\x89PNG-bytes")
    response = client.get(f"/images/{image_id}.png")
    assert response.status_code == 200 and response.content == b"\x89PNG-bytes"
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    etag = response.headers["etag"]
    again = client.get(f"/images/{image_id}.png", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("name", ["nope.png", f"{'A' * 22}.png", "..%2F..%2Fsecret.png", f"{'A' * 22}.jpg"])
def test_unknown_images_are_404(client, name):
    response = client.get(f"/images/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_metrics_count_requests_by_route_template_and_status(client):
    client.get("/jobs/0b8f7c7e-9a58-4b8e-9f0e-2b6a8f0d1c2e")
    client.get("/jobs/11111111-2222-3333-4444-555555555555")
    client.get("/healthz")
    metrics = samples(client.get("/metrics").text)
    key = (("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "404"))
    assert metrics[("star_api_requests_total", key)] == 2
    assert metrics[("star_api_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200")))] == 1


def test_metrics_report_queue_depth_and_finished_job_timings(client, conn):
    enqueue(conn, {"prompt": "x", "n": 1, "size": 256}, "tiny", job_id=str(uuid.uuid4()), deadline_s=60, result_ttl=60,
            failure_ttl=60)
    record_timings(conn, "tiny", "succeeded", latency_s=3.0, queue_wait_s=1.0)
    record_timings(conn, "tiny", "succeeded", latency_s=2.0, queue_wait_s=0.5, lane="high")
    record_timings(conn, "tiny", "failed", latency_s=0.7, queue_wait_s=None)
    metrics = samples(client.get("/metrics").text)
    assert metrics[("star_queue_depth", (("lane", "normal"), ("model", "tiny")))] == 1
    assert metrics[("star_queue_depth", (("lane", "high"), ("model", "tiny")))] == 0   # every lane, also empty
    assert metrics[("star_job_latency_seconds_count", (("model", "tiny"), ("status", "succeeded")))] == 2
    assert metrics[("star_job_latency_seconds_sum", (("model", "tiny"), ("status", "failed")))] == 0.7
    assert metrics[("star_job_queue_wait_seconds_count", (("lane", "normal"), ("model", "tiny")))] == 1
    assert metrics[("star_job_queue_wait_seconds_sum", (("lane", "high"), ("model", "tiny")))] == 0.5
    # each finished job is observed once: the timings were drained from Redis
    assert conn.llen(TIMINGS_KEY) == 0
    again = samples(client.get("/metrics").text)
    assert again[("star_job_latency_seconds_count", (("model", "tiny"), ("status", "succeeded")))] == 2
