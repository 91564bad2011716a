"""The HTTP API against a real Redis, with worker registry entries standing in for workers."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus

from app.jobs.keys import WORKERS_SET, WORKER_KEY
from app.jobs.read import queue_depth
from app.jobs.rq_adapter import SERIALIZER, queue_name
from app.jobs.workers import WorkerEntry, live_workers, publish_worker

PROMPT = {"prompt": "a red fox in the snow"}


def publish(conn, name="w1", model="tiny", size=256, state="ready", max_batch=8, sampling=None, sampler_head=None):
    publish_worker(conn, WorkerEntry(name=name, model=model, state=state, size=size, queue=queue_name(model),
                                     max_batch=max_batch, sampling=sampling, sampler_head=sampler_head), ttl_s=60)


@pytest.fixture
def make_client(make_api_settings):
    clients = []

    def make(**overrides) -> TestClient:
        from app.main import create_app

        client = TestClient(create_app(make_api_settings(**overrides)))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client):
    return make_client()


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    return body["error"]


def test_importing_the_api_does_not_import_torch():
    code = ("import sys; from app.main import create_app; create_app(); "
            "bad = [m for m in ('torch', 'model', 'worker', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("body, field, expect", [
    ({}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "1 to 2000 characters"),
    ({"prompt": "   "}, "prompt", "non-whitespace"),
    ({**PROMPT, "n": 0}, "n", "an integer from 1 to 4"),
    ({**PROMPT, "n": 5}, "n", "an integer from 1 to 4"),
    ({**PROMPT, "top_p": 1.5}, "top_p", "a number from 0.0 to 1.0"),
    ({**PROMPT, "top_k": -1}, "top_k", "an integer from 0 to 16384"),
    ({**PROMPT, "temperature": 0}, "temperature", "greater than 0.0 and at most 5.0"),
    ({**PROMPT, "seed": -1}, "seed", "from 0 to 4294967295"),
    ({**PROMPT, "guidance_scale": "lots"}, "guidance_scale", "a number from 0.0 to 30.0"),
    ({**PROMPT, "steps": 50}, "steps", "unknown field `steps`"),
    ({**PROMPT, "sampler": "fast"}, "sampler", "allowed: one of auto, head, plain"),
])
def test_invalid_requests_are_422_naming_the_field_and_range(client, conn, body, field, expect):
    publish(conn)
    error = assert_error(client.post("/generate", json=body), 422, "invalid_request", field)
    assert expect in error["message"]
    assert queue_depth(conn, "tiny") == 0


def test_a_body_that_is_not_json_is_422(client, conn):
    publish(conn)
    response = client.post("/generate", content=b"prompt=fox", headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


def test_no_worker_is_503(client):
    assert_error(client.post("/generate", json=PROMPT), 503, "no_worker")
    assert_error(client.get("/readyz"), 503, "no_worker")


def test_size_no_worker_serves_is_422_naming_served_sizes(client, conn):
    publish(conn)
    error = assert_error(client.post("/generate", json={**PROMPT, "size": 512}), 422, "size_not_served", "size")
    assert "served sizes: 256" in error["message"]


def _registry_reads(conn) -> int:
    return int(conn.info("commandstats").get("cmdstat_smembers", {}).get("calls", 0))


@pytest.mark.parametrize("cache_s, reads", [(60.0, 1), (0.0, 5)])
def test_generate_reads_the_worker_registry_once_per_cache_period(make_client, conn, cache_s, reads):
    publish(conn, "w256", "tiny", 256)
    client = make_client(worker_cache_s=cache_s)
    before = _registry_reads(conn)
    for _ in range(5):
        assert client.post("/generate", json=PROMPT).status_code == 202
    assert _registry_reads(conn) - before == reads


def test_accepted_jobs_report_their_place_in_the_queue(client, conn):
    publish(conn, "w256", "tiny", 256)
    accepted = [client.post("/generate", json=PROMPT).json() for _ in range(3)]
    assert [a["queue_position"] for a in accepted] == [0, 1, 2]
    assert [client.get(f"/jobs/{a['id']}").json()["queue_position"] for a in accepted] == [0, 1, 2]


def test_a_size_served_by_a_new_worker_is_accepted_at_once_despite_the_cache(make_client, conn):
    publish(conn, "w256", "tiny", 256)
    client = make_client(worker_cache_s=60.0)
    assert client.post("/generate", json=PROMPT).status_code == 202          # caches {256}
    publish(conn, "w512", "star-512", 512)
    response = client.post("/generate", json={**PROMPT, "size": 512})
    assert response.status_code == 202, response.text
    assert client.get(f"/jobs/{response.json()['id']}").json()["model"] == "star-512"
    assert_error(client.post("/generate", json={**PROMPT, "size": 1024}), 422, "size_not_served", "size")


def test_generate_queues_a_job_and_reports_it(client, conn):
    publish(conn, "w256", "tiny", 256)
    publish(conn, "w512", "star-512", 512)
    response = client.post("/generate", json={**PROMPT, "n": 2})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued" and accepted["queue_position"] == 0
    assert response.headers["location"] == accepted["status_url"] == f"http://testserver/jobs/{accepted['id']}"

    view = client.get(f"/jobs/{accepted['id']}").json()
    assert view["status"] == "queued" and view["queue_position"] == 0
    assert view["model"] == "star-512"                      # default size: the largest served
    request = view["request"]
    assert request["size"] == 512 and request["n"] == 2 and 0 <= request["seed"] < 2**31
    # sampling fields left out are the model's defaults, known once a worker starts the job
    assert request | {"seed": 0} == {"prompt": PROMPT["prompt"], "negative_prompt": "", "size": 512, "n": 2,
                                     "seed": 0, "guidance_scale": None, "top_k": None, "top_p": None,
                                     "temperature": None, "guidance_stop_scale": None, "sampler": "auto",
                                     "priority": "normal"}
    assert view["timings"]["queued_at"] and view["timings"]["started_at"] is None
    assert view["images"] is None and view["error"] is None

    second = client.post("/generate", json={**PROMPT, "size": 256, "seed": 7, "top_k": 0, "temperature": 0.5}).json()
    request = client.get(f"/jobs/{second['id']}").json()["request"]
    assert request["seed"] == 7 and request["top_k"] == 0 and request["temperature"] == 0.5
    assert request["guidance_scale"] is None and request["top_p"] is None
    assert queue_depth(conn, "star-512") == 1 and queue_depth(conn, "tiny") == 1


def test_draining_and_sizeless_workers_serve_nothing(client, conn):
    publish(conn, "w1", state="draining")
    publish(conn, "w2", size=None, state="starting")
    assert_error(client.post("/generate", json=PROMPT), 503, "no_worker")


def test_full_queue_is_429_with_retry_after(make_client, conn):
    client = make_client(queue_limit=2, retry_after_s=7)
    publish(conn)
    assert [client.post("/generate", json=PROMPT).status_code for _ in range(2)] == [202, 202]
    response = client.post("/generate", json=PROMPT)
    assert_error(response, 429, "queue_full")
    assert response.headers["retry-after"] == "7"


@pytest.mark.parametrize("path", ["/jobs/nope", "/jobs/0b8f7c7e-9a58-4b8e-9f0e-2b6a8f0d1c2e", "/no/such/route"])
def test_unknown_ids_and_routes_are_404(client, path):
    assert_error(client.get(path), 404, "not_found")


def test_delete_unknown_job_is_404(client):
    assert_error(client.delete("/jobs/0b8f7c7e-9a58-4b8e-9f0e-2b6a8f0d1c2e"), 404, "not_found")


def test_cancel_a_queued_job_at_once(client, conn):
    publish(conn)
    job_id = client.post("/generate", json=PROMPT).json()["id"]
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert queue_depth(conn, "tiny") == 0
    assert Job.fetch(job_id, connection=conn, serializer=SERIALIZER).get_status() == JobStatus.CANCELED
    assert client.get(f"/jobs/{job_id}").json()["status"] == "canceled"
    again = client.delete(f"/jobs/{job_id}")   # DELETE is idempotent
    assert again.status_code == 200 and again.json()["status"] == "canceled"


def test_a_job_queued_past_its_deadline_reads_as_expired(make_client, conn):
    client = make_client(job_deadline_s=0.2)
    publish(conn)
    job_id = client.post("/generate", json=PROMPT).json()["id"]
    time.sleep(0.3)
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "expired" and view["error"]["code"] == "expired"
    assert_error(client.delete(f"/jobs/{job_id}"), 409, "conflict")


def test_health_readiness_and_models(client, conn):
    assert client.get("/healthz").json() == {"status": "ok"}
    defaults = {"guidance_scale": 3.0, "top_k": 0, "top_p": 0.0, "temperature": 1.0}
    publish(conn, "a", "tiny", 256, state="busy", max_batch=4, sampling=defaults, sampler_head=False)
    publish(conn, "b", "tiny", 256, state="ready", max_batch=8, sampling=defaults, sampler_head=False)
    publish(conn, "c", "star-512", 512, state="starting")
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny"]
    models = client.get("/models").json()
    assert models["sizes"] == [256, 512] and models["default_size"] == 512
    tiny = next(m for m in models["models"] if m["name"] == "tiny")
    lanes = {lane: {"queue": queue, "queue_depth": 0, "oldest_wait_s": 0.0} for lane, queue in
             [("high", "star-tiny@high"), ("normal", "star-tiny"), ("low", "star-tiny@low")]}
    assert tiny == {"name": "tiny", "size": 256, "queue": "star-tiny", "queue_depth": 0, "lanes": lanes, "workers": 2,
                    "states": {"busy": 1, "ready": 1}, "max_batch": 8, "sampling": defaults, "example_prompts": [],
                    "sampler_head": False, "scales": None, "guidance_stop_scale": None}   # no schedule reported
    star_512 = next(m for m in models["models"] if m["name"] == "star-512")
    assert star_512["sampling"] is None and star_512["sampler_head"] is None   # not loaded yet


def test_sampler_head_on_a_model_without_one_is_422_naming_sampler(client, conn):
    publish(conn, "w256", "tiny", 256, sampler_head=False)
    error = assert_error(client.post("/generate", json={**PROMPT, "sampler": "head"}), 422,
                         "sampler_not_available", "sampler")
    assert "tiny (size 256) has none" in error["message"] and "no served model has one" in error["message"]
    assert "'auto' or 'plain'" in error["message"] and queue_depth(conn, "tiny") == 0
    for sampler in ("auto", "plain", None):   # null: the default, auto
        response = client.post("/generate", json={**PROMPT, "sampler": sampler})
        assert response.status_code == 202, response.text
        assert client.get(f"/jobs/{response.json()['id']}").json()["request"]["sampler"] == (sampler or "auto")


def test_sampler_head_goes_to_a_model_with_a_head(make_client, conn):
    publish(conn, "plain256", "tiny", 256, sampler_head=False)
    publish(conn, "head256", "tiny-sampler", 256, sampler_head=True)
    publish(conn, "plain512", "star-512", 512, sampler_head=False)
    client = make_client(worker_cache_s=60.0)

    def model(**body) -> str:
        response = client.post("/generate", json={**PROMPT, **body})
        assert response.status_code == 202, response.text
        return client.get(f"/jobs/{response.json()['id']}").json()["model"]

    assert model() == "star-512"                                      # the largest size, any sampler
    assert model(sampler="head") == "tiny-sampler"                    # the largest size with a head
    assert model(sampler="head", size=256) == "tiny-sampler"          # among the models of a size
    error = assert_error(client.post("/generate", json={**PROMPT, "sampler": "head", "size": 512}), 422,
                         "sampler_not_available", "sampler")
    assert "star-512 (size 512) has none (sizes served by a model with one: 256" in error["message"]
    models = {m["name"]: m["sampler_head"] for m in client.get("/models").json()["models"]}
    assert models == {"tiny": False, "tiny-sampler": True, "star-512": False}


def test_worker_entries_of_newer_workers_are_read(client, conn):
    """An entry with fields this API does not know (a newer worker) still counts."""
    import json

    entry = {"name": "new", "model": "tiny", "state": "ready", "size": 256, "a_later_field": 1}
    conn.set(WORKER_KEY.format("new"), json.dumps(entry), ex=60)
    conn.sadd(WORKERS_SET, "new")
    assert [e.name for e in live_workers(conn)] == ["new"]
    assert client.get("/models").json()["sizes"] == [256]


def test_a_worker_whose_heartbeat_expired_is_gone(client, conn):
    publish_worker(conn, WorkerEntry(name="old", model="tiny", state="ready", size=256), ttl_s=1)
    assert client.get("/readyz").status_code == 200
    time.sleep(1.2)
    assert client.get("/readyz").status_code == 503
    assert conn.smembers(WORKERS_SET) == set()


def test_redis_down_is_503(make_client):
    from app.redis_server import free_port

    with make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        assert client.get("/healthz").status_code == 200
        assert_error(client.get("/readyz"), 503, "redis_unavailable")
        assert_error(client.post("/generate", json=PROMPT), 503, "redis_unavailable")


def test_openapi_documents_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/jobs/{job_id}", "/images/{image_id}.png", "/healthz", "/readyz", "/models",
            "/metrics"} <= set(paths)
    assert client.get("/docs").status_code == 200
