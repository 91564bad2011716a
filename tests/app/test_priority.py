"""`priority` on POST /generate and the OpenAI route, against a real Redis (worker registry entries
stand in for workers; the lanes' order in a real worker is tests/worker/test_lanes.py): who may
use `high`, limits across lanes, the job view, GET /models and /metrics per lane."""
from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from app.jobs.read import lane_stats, queue_depth
from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker

KEYS = {"ops": "ops-secret-key-1", "bulk": "bulk-secret-key-2"}
BODY = {"prompt": "a lighthouse in fog"}


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture
def make_client(make_api_settings, conn):
    publish_worker(conn, WorkerEntry(name="w", model="tiny", state="ready", size=256, queue=queue_name("tiny")),
                   ttl_s=60)
    clients = []

    def make(**overrides) -> TestClient:
        from app.main import create_app

        client = TestClient(create_app(make_api_settings(**overrides)))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def keyed(make_client, **overrides) -> TestClient:
    entries = ",".join(f"{name}:{hashlib.sha256(key.encode()).hexdigest()}" for name, key in KEYS.items())
    return make_client(api_keys=entries, **overrides)


def test_high_is_refused_with_403_unless_the_key_is_listed(make_client, conn):
    client = keyed(make_client, high_priority_keys="ops")
    refused = client.post("/generate", json={**BODY, "priority": "high"}, headers=bearer("bulk"))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "priority_not_allowed"
    assert refused.json()["error"]["field"] == "priority"
    assert "STAR_HIGH_PRIORITY_KEYS" in refused.json()["error"]["message"]
    assert queue_depth(conn, "tiny") == 0
    accepted = client.post("/generate", json={**BODY, "priority": "high"}, headers=bearer("ops"))
    assert accepted.status_code == 202, accepted.text
    low = client.post("/generate", json={**BODY, "priority": "low"}, headers=bearer("bulk"))
    assert low.status_code == 202 and low.json()["queue_position"] == 1   # behind the high job
    view = client.get(f"/jobs/{accepted.json()['id']}", headers=bearer("ops")).json()
    assert view["request"]["priority"] == "high" and view["queue_position"] == 0
    assert {lane: s.depth for lane, s in lane_stats(conn, "tiny").items()} == {"high": 1, "normal": 0, "low": 1}


def test_without_the_setting_nobody_may_use_high_and_star_allows_everyone(make_client):
    assert make_client().post("/generate", json={**BODY, "priority": "high"}).status_code == 403
    assert make_client().post("/generate", json=BODY).json()["status"] == "queued"   # normal by default
    assert make_client(high_priority_keys="*").post("/generate", json={**BODY, "priority": "high"}).status_code == 202


def test_an_unknown_priority_is_422_naming_the_lanes(make_client):
    response = make_client().post("/generate", json={**BODY, "priority": "urgent"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "priority"
    assert "'high', 'normal' or 'low'" in response.json()["error"]["message"]


def test_per_key_job_slots_and_the_queue_limit_hold_across_lanes(make_client):
    client = keyed(make_client, high_priority_keys="*", max_concurrent_jobs_per_key=1, queue_limit=2)
    assert client.post("/generate", json={**BODY, "priority": "low"}, headers=bearer("ops")).status_code == 202
    slot = client.post("/generate", json={**BODY, "priority": "high"}, headers=bearer("ops"))
    assert slot.status_code == 429 and slot.json()["error"]["code"] == "too_many_jobs"
    assert client.post("/generate", json={**BODY, "priority": "high"}, headers=bearer("bulk")).status_code == 202
    full = keyed(make_client, high_priority_keys="*", queue_limit=2).post(
        "/generate", json={**BODY, "priority": "high"}, headers=bearer("bulk"))
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"


def test_models_and_metrics_report_each_lane(make_client):
    client = make_client(high_priority_keys="*")
    for priority in ("low", "low", "high"):
        assert client.post("/generate", json={**BODY, "priority": priority}).status_code == 202
    (model,) = client.get("/models").json()["models"]
    assert model["queue_depth"] == 3 and list(model["lanes"]) == ["high", "normal", "low"]
    assert {lane: v["queue_depth"] for lane, v in model["lanes"].items()} == {"high": 1, "normal": 0, "low": 2}
    assert model["lanes"]["low"]["queue"] == "star-tiny@low" and model["lanes"]["low"]["oldest_wait_s"] >= 0
    text = client.get("/metrics").text
    for lane, depth in (("high", 1), ("normal", 0), ("low", 2)):
        assert f'star_queue_depth{{lane="{lane}",model="tiny"}} {depth}.0' in text


def test_the_openai_route_takes_priority_in_its_extra_body(make_client):
    response = make_client().post("/v1/images/generations", json={**BODY, "priority": "high"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "priority_not_allowed"
    assert response.json()["error"]["param"] == "priority"
    bad = make_client().post("/v1/images/generations", json={**BODY, "priority": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"


def test_the_schema_documents_priority(make_client):
    schema = make_client().get("/openapi.json").json()
    field = schema["components"]["schemas"]["GenerateRequest"]["properties"]["priority"]
    assert field["enum"] == ["high", "normal", "low"] and field["default"] == "normal"
    assert "403" in schema["paths"]["/generate"]["post"]["responses"]
    assert "lanes" in schema["components"]["schemas"]["ModelOut"]["properties"]
    openai_body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    assert openai_body["schema"]["properties"]["priority"]["enum"] == ["high", "normal", "low"]
