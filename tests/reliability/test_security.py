"""API keys, per-key limits, Idempotency-Key, request limits, signed image URLs and checkpoint
trust, against a real Redis: the API in-process (ASGI) with a worker registry entry standing in
for a worker where no job needs to run, and a real worker subprocess where one must."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.jobs.admission import held_slots
from app.jobs.read import queue_depth
from app.jobs.rq_adapter import connect, get_queue, queue_name
from app.jobs.workers import WorkerEntry, publish_worker
from app.storage import LocalStorage

KEYS = {"alice": "alice-secret-key-1", "bob": "bob-secret-key-2"}
BODY = {"prompt": "a red fox in the snow"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def publish(conn, model="noop-64", size=64) -> None:
    publish_worker(conn, WorkerEntry(name="w", model=model, state="ready", size=size,
                                         queue=queue_name(model)), ttl_s=60)


@pytest.fixture
def make_client(make_api_settings, tmp_path):
    """An API with alice's key in a file (hashed) and bob's in the environment (plaintext)."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# one key per line\nalice:{sha(KEYS['alice'])}\n\n")
    clients = []

    def make(**overrides) -> TestClient:
        from app.main import create_app

        settings = make_api_settings(**{"api_keys_file": keys_file, "api_keys": KEYS["bob"], **overrides})
        client = TestClient(create_app(settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def error_code(response) -> str:
    body = response.json()
    assert set(body["error"]) == {"code", "message", "field"}, body
    return body["error"]["code"]


# ------------------------------------------------------------------------------------ API keys

def test_requests_without_a_valid_key_are_401_and_probes_stay_open(make_client, conn):
    client = make_client()
    publish(conn)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS['alice']}"},
                    {"Authorization": f"Bearer {sha(KEYS['alice'])}"}):   # the hash is not the key
        response = client.post("/generate", json=BODY, headers=headers)
        assert response.status_code == 401 and error_code(response) == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    for path in ("/jobs/00000000-0000-4000-8000-000000000000", "/models",
                 "/jobs/00000000-0000-4000-8000-000000000000/events"):
        assert client.get(path).status_code == 401, path
    assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
    assert queue_depth(conn, "noop-64") == 0
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.post("/generate", json=BODY, headers=bearer("alice")).status_code == 202   # from the file
    assert client.post("/generate", json=BODY, headers=bearer("bob")).status_code == 202     # from the env
    assert "bearer" in str(client.get("/openapi.json").json()["components"]["securitySchemes"]).lower()


def test_keys_load_hashed_or_plain_and_auth_is_off_without_keys(make_api_settings, conn):
    from app.auth import ApiKeys
    from app.main import create_app

    keys = ApiKeys.load(f"ci:{sha('k1')}, plain-key ,# comment", None)
    assert keys.name_of("k1") == "ci" and keys.name_of("plain-key") == f"key-{sha('plain-key')[:8]}"
    assert keys.name_of("k2") is None and keys.name_of("") is None
    assert all(len(digest) == 32 for _, digest in keys.hashes)   # only hashes are kept
    publish(conn)
    with TestClient(create_app(make_api_settings())) as open_client:
        assert open_client.post("/generate", json=BODY).status_code == 202


def test_requests_per_minute_per_key_hold_across_api_replicas(make_client, conn):
    import time

    one, two = make_client(rate_limit_per_min=3), make_client(rate_limit_per_min=3)
    publish(conn)
    if time.time() % 60 > 57:   # one-minute windows: stay inside one
        time.sleep(60 - time.time() % 60 + 0.1)
    codes = [c.get("/models", headers=bearer("alice")).status_code for c in (one, two, one)]
    assert codes == [200, 200, 200]
    refused = two.get("/models", headers=bearer("alice"))
    assert refused.status_code == 429 and error_code(refused) == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert one.get("/models", headers=bearer("bob")).status_code == 200   # another key, its own window


def test_concurrent_jobs_per_key_are_limited_and_freed_on_cancel_and_expiry(make_client, conn):
    import time

    client = make_client(max_concurrent_jobs_per_key=2, job_deadline_s=1.0)
    publish(conn)
    first, second = (client.post("/generate", json=BODY, headers=bearer("alice")).json()["id"] for _ in range(2))
    refused = client.post("/generate", json=BODY, headers=bearer("alice"))
    assert refused.status_code == 429 and error_code(refused) == "too_many_jobs" and refused.headers["retry-after"]
    assert client.post("/generate", json=BODY, headers=bearer("bob")).status_code == 202   # bob's own slots
    assert client.delete(f"/jobs/{first}", headers=bearer("alice")).status_code == 200     # cancel frees one
    third = client.post("/generate", json=BODY, headers=bearer("alice"))
    assert third.status_code == 202
    time.sleep(1.1)   # second and third expire in the queue (no worker): their slots are pruned
    assert [client.post("/generate", json=BODY, headers=bearer("alice")).status_code for _ in range(3)] \
        == [202, 202, 429]
    assert second not in held_slots(conn, "alice")


def test_a_job_slot_is_freed_when_a_worker_ends_the_job(env_stack, h, tmp_path, redis_url):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"alice:{sha(KEYS['alice'])}\n")
    api, start_worker = env_stack(api_keys_file=keys_file, max_concurrent_jobs_per_key=1)
    api.client.headers.update(bearer("alice"))
    start_worker("w", TEST_OOM_PROMPT="huge")
    for prompt, status in (("fits", "succeeded"), ("huge", "failed"), ("fits again", "succeeded")):
        job_id = h.post(api.client, prompt)
        assert h.wait_job(api.client, job_id, timeout=30)["status"] == status
    conn = connect(redis_url)
    assert held_slots(conn, "alice") == set()


# ------------------------------------------------------------------------------------ Idempotency-Key

def test_idempotency_key_returns_the_same_job_and_refuses_another_body(make_client, conn):
    client = make_client()
    publish(conn)
    headers = {**bearer("alice"), "Idempotency-Key": "order-42"}
    first = client.post("/generate", json=BODY, headers=headers)
    again = client.post("/generate", json=BODY, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert queue_depth(conn, "noop-64") == 1
    other = client.post("/generate", json={**BODY, "seed": 1}, headers=headers)
    assert other.status_code == 409 and error_code(other) == "idempotency_conflict"
    bobs = client.post("/generate", json=BODY, headers={**bearer("bob"), "Idempotency-Key": "order-42"})
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]   # keys are per API key
    too_long = client.post("/generate", json=BODY, headers={**bearer("alice"), "Idempotency-Key": "k" * 300})
    assert too_long.status_code == 422


def test_a_refused_first_request_leaves_its_idempotency_key_free(make_client, conn):
    client = make_client(queue_limit=1)
    publish(conn)
    assert client.post("/generate", json=BODY, headers=bearer("alice")).status_code == 202
    headers = {**bearer("alice"), "Idempotency-Key": "retry-me"}
    assert client.post("/generate", json=BODY, headers=headers).status_code == 429   # queue full
    conn.delete(get_queue(conn, "noop-64").key)                                    # room again
    assert client.post("/generate", json=BODY, headers=headers).status_code == 202


# ------------------------------------------------------------------------------------ limits

def test_bodies_prompts_and_fields_are_limited(make_client, conn):
    client = make_client(max_body_bytes=2048, max_prompt_chars=100)
    publish(conn)
    client.headers.update(bearer("alice"))
    big = client.post("/generate", json={"prompt": "x" * 5000})
    assert big.status_code == 413 and error_code(big) == "payload_too_large"

    def chunks():   # no Content-Length: the size is counted as the body streams in
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'
    streamed = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    long = client.post("/generate", json={"prompt": "z" * 101})
    assert long.status_code == 422 and long.json()["error"]["field"] == "prompt" and "at most 100" in long.text
    assert client.post("/generate", json={"prompt": "ok", "negative_prompt": "n" * 101}).status_code == 422
    assert client.post("/generate", json={"prompt": "ok", "n": 5}).status_code == 422
    assert client.post("/generate", json={"prompt": "ok", "sampler": "ddim"}).status_code == 422
    assert queue_depth(conn, "noop-64") == 0
    assert client.post("/generate", json={"prompt": "z" * 100}).status_code == 202


# ------------------------------------------------------------------------------------ image URLs

def test_signed_image_urls_expire_and_cannot_be_forged(make_client, tmp_path):
    from app.signing import UrlSigner

    client = make_client(url_signing_key="s3cret", url_ttl_s=600)
    storage = LocalStorage(tmp_path / "images", "http://testserver")
    storage.put("AAAAAAAAAAAAAAAAAAAAAA", b"\x89PNG fake")
    url = client.app.state.ctx.storage.url("AAAAAAAAAAAAAAAAAAAAAA")
    assert "?expires=" in url and "&sig=" in url
    ok = client.get(url)
    assert ok.status_code == 200 and 0 < int(ok.headers["cache-control"].split("max-age=")[1].split(",")[0]) <= 660
    for bad in (url.split("?")[0], url[:-3] + "abc", url.replace("expires=", "expires=1")):
        response = client.get(bad)
        assert response.status_code == 403 and error_code(response) == "forbidden", bad
    past = UrlSigner("s3cret", 600, clock=lambda: 0.0).query("AAAAAAAAAAAAAAAAAAAAAA")
    expired = client.get(f"/images/AAAAAAAAAAAAAAAAAAAAAA.png?{past}")
    assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"]
    other = client.app.state.ctx.storage.url("BBBBBBBBBBBBBBBBBBBBBB").split("?")[1]
    assert client.get(f"/images/AAAAAAAAAAAAAAAAAAAAAA.png?{other}").status_code == 403   # bound to its image


def test_finished_jobs_carry_signed_urls_that_work(env_stack, h):
    api, start_worker = env_stack(url_signing_key="s3cret")
    start_worker("w")
    view = h.wait_job(api.client, h.post(api.client, "a signed fox", n=2), timeout=30)
    for image in view["images"]:
        assert "sig=" in image["url"] and api.client.get(image["url"]).status_code == 200
        assert api.client.get(image["url"].split("?")[0]).status_code == 403


# ------------------------------------------------------------------------------------ checkpoints

class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = ""


def test_a_pickled_checkpoint_that_runs_code_is_refused_unless_trusted(tmp_path):
    global MARKER
    torch = pytest.importorskip("torch")
    from model.weights import UntrustedPickleError, torch_load

    MARKER = str(tmp_path / "pwned")
    checkpoint = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, checkpoint)
    with pytest.raises(UntrustedPickleError, match="trust"):
        torch_load(checkpoint, "checkpoint")
    assert not Path(MARKER).exists()                      # refused before running anything
    torch_load(checkpoint, "checkpoint", trust_pickle=True)
    assert Path(MARKER).exists()                          # what trusting a file means
