"""Tenant isolation with API keys on: a job belongs to the key that created it (another key gets the
404 of an unknown id, an admin key sees everything), Idempotency-Keys are scoped per key, and the
per-key concurrent-job limit holds under a burst of simultaneous POSTs (real uvicorn, real Redis).
"""
from __future__ import annotations

import hashlib
import threading
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from rq.registry import FinishedJobRegistry

from app.auth import ApiKeys
from app.jobs.rq_adapter import connect, get_queue, queue_name
from app.jobs.workers import WorkerEntry, publish_worker

KEYS = {"alice": "alice-secret-key-1", "bob": "bob-secret-key-2", "root": "root-admin-key-3"}
BODY = {"prompt": "a red fox in the snow"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def key_settings(tmp_path) -> dict:
    """alice and bob as keys (one hashed in a file, one plaintext), root as the admin key."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"alice:{sha(KEYS['alice'])}\n")
    return {"api_keys_file": keys_file, "api_keys": KEYS["bob"], "admin_api_keys": f"root:{sha(KEYS['root'])}"}


def publish(conn, model="noop-64", size=64) -> None:
    """A registry entry standing in for a worker (jobs stay queued: none runs them)."""
    publish_worker(conn, WorkerEntry(name="w", model=model, state="ready", size=size, queue=queue_name(model)),
                   ttl_s=120)


@pytest.fixture
def client(make_api_settings, tmp_path, conn):
    from app.main import create_app

    publish(conn)
    with TestClient(create_app(make_api_settings(**key_settings(tmp_path)))) as test_client:
        yield test_client


def events(client: TestClient, job_id: str, who: str) -> httpx.Response:
    return client.get(f"/jobs/{job_id}/events", headers=bearer(who))


# ------------------------------------------------------------------------------------ ownership

def test_another_keys_job_is_answered_exactly_like_an_unknown_id(client):
    job_id = client.post("/generate", json=BODY, headers=bearer("alice")).json()["id"]
    unknown = str(uuid.uuid4())
    for method, path in (("GET", "/jobs/{}"), ("DELETE", "/jobs/{}"), ("GET", "/jobs/{}/events")):
        theirs = client.request(method, path.format(job_id), headers=bearer("bob"))
        nobody = client.request(method, path.format(unknown), headers=bearer("bob"))
        assert theirs.status_code == nobody.status_code == 404, (method, path, theirs.text)
        assert theirs.text.replace(job_id, unknown) == nobody.text, (method, path)
        assert "fox" not in theirs.text
    mine = client.get(f"/jobs/{job_id}", headers=bearer("alice")).json()   # the owner still sees it
    assert mine["status"] == "queued" and mine["request"]["prompt"] == BODY["prompt"]
    assert not mine["cancel_requested"]                                    # bob's DELETE did nothing


def test_the_owner_and_an_admin_key_read_follow_and_cancel_it(client):
    alices = client.post("/generate", json=BODY, headers=bearer("alice")).json()["id"]
    bobs = client.post("/generate", json=BODY, headers=bearer("bob")).json()["id"]
    assert client.get(f"/jobs/{alices}", headers=bearer("root")).json()["status"] == "queued"
    assert client.delete(f"/jobs/{alices}", headers=bearer("root")).status_code == 200
    assert client.delete(f"/jobs/{bobs}", headers=bearer("bob")).status_code == 200
    for job_id, who in ((alices, "alice"), (alices, "root"), (bobs, "bob"), (bobs, "root")):
        stream = events(client, job_id, who)
        assert stream.status_code == 200 and "event: canceled" in stream.text, (job_id, who)
    assert events(client, bobs, "alice").status_code == 404
    assert client.post("/generate", json=BODY, headers=bearer("root")).status_code == 202   # a key like the others


def test_an_idempotency_key_replayed_by_another_key_never_returns_the_first_keys_job(client):
    first = client.post("/generate", json=BODY, headers={**bearer("alice"), "Idempotency-Key": "order-7"})
    again = client.post("/generate", json=BODY, headers={**bearer("alice"), "Idempotency-Key": "order-7"})
    assert again.json()["id"] == first.json()["id"]                          # the owner's replay
    other = client.post("/generate", json=BODY, headers={**bearer("bob"), "Idempotency-Key": "order-7"})
    assert other.status_code == 202 and "idempotent-replayed" not in other.headers
    assert other.json()["id"] != first.json()["id"]
    assert client.get(f"/jobs/{other.json()['id']}", headers=bearer("bob")).status_code == 200
    conflict = client.post("/generate", json={**BODY, "seed": 1}, headers={**bearer("bob"), "Idempotency-Key": "order-7"})
    assert conflict.status_code == 409 and first.json()["id"] not in conflict.text


def test_the_openai_routes_job_belongs_to_its_key(env_stack, h, tmp_path, redis_url):
    api, start_worker = env_stack(**key_settings(tmp_path))
    start_worker("w")
    answer = api.client.post("/v1/images/generations", json={"prompt": "a fox", "n": 1}, headers=bearer("alice"))
    assert answer.status_code == 200, answer.text
    conn = connect(redis_url)
    [job_id] = FinishedJobRegistry(get_queue(conn, "noop-64").name, connection=conn).get_job_ids()
    assert api.client.get(f"/jobs/{job_id}", headers=bearer("bob")).status_code == 404
    mine = api.client.get(f"/jobs/{job_id}", headers=bearer("alice")).json()
    assert [i["url"] for i in mine["images"]] == [d["url"] for d in answer.json()["data"]]


def test_who_sees_which_job_and_key_names_stay_unique():
    keys = ApiKeys.load(f"alice:{sha('a')},bob:{sha('b')}", None, f"root:{sha('r')}")
    assert keys.may_see("alice", "alice") and not keys.may_see("alice", "bob")
    assert keys.may_see("root", "alice") and keys.may_see("root", None)
    assert not keys.may_see("alice", None)           # created while keys were off: admins only
    assert keys.name_of("r") == "root" and keys.admins == {"root"}
    assert ApiKeys.load(None, None).may_see("anonymous", None)   # keys off: no owners
    assert ApiKeys.load(None, None, f"root:{sha('r')}").enabled   # an admin key alone turns keys on
    with pytest.raises(ValueError, match="alice"):
        ApiKeys.load(f"alice:{sha('a')},alice:{sha('other')}", None)


# ------------------------------------------------------------------------------------ job slots

def burst(url: str, who: str, count: int) -> list[httpx.Response]:
    """`count` POSTs released at the same instant, each on its own connection."""
    start, answers = threading.Barrier(count), [None] * count

    def post(i: int) -> None:
        with httpx.Client(base_url=url, headers=bearer(who), timeout=60) as http:
            start.wait()
            answers[i] = http.post("/generate", json={**BODY, "seed": i})
    threads = [threading.Thread(target=post, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_the_per_key_job_limit_holds_under_a_burst_and_frees_when_jobs_end(api_server, make_api_settings,
                                                                           tmp_path, conn):
    publish(conn)
    settings = make_api_settings(**key_settings(tmp_path), max_concurrent_jobs_per_key=5)
    queue = get_queue(conn, "noop-64")
    with api_server(settings) as api:
        for round_ in range(2):
            answers = burst(api.url, "alice", 40)
            accepted = [a.json()["id"] for a in answers if a.status_code == 202]
            codes = sorted({a.status_code for a in answers})
            assert len(accepted) == 5 and codes == [202, 429], (round_, codes, len(accepted))
            assert queue.count == 5                               # in flight: never more than the limit
            bobs = api.client.post("/generate", json=BODY, headers=bearer("bob"))
            assert bobs.status_code == 202                        # another key: its own slots
            for job_id in accepted:   # her jobs end (canceled): the next burst gets 5 slots again
                assert api.client.delete(f"/jobs/{job_id}", headers=bearer("alice")).status_code == 200
            assert api.client.delete(f"/jobs/{bobs.json()['id']}", headers=bearer("bob")).status_code == 200
