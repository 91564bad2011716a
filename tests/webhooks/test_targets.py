"""Where a webhook may go: refused targets are a 422 at submission (POST /generate) or a 400 on the
OpenAI route, checked again at delivery time; what a private target is; how a checked target is
pinned to the address that was checked (DNS rebinding)."""
from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient

from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker
from app.main import create_app
from app.webhook_targets import TargetRefused, forbidden, resolve_target


@pytest.fixture
def registry(conn):
    """A registered worker that never takes jobs: submissions are accepted and stay queued."""
    publish_worker(conn, WorkerEntry(name="idle", model="tiny", state="ready", size=256, queue=queue_name("tiny")),
                   ttl_s=600)


def post(client, **fields):
    return client.post("/generate", json={"prompt": "a red fox", **fields})


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:9/hook", "loopback"),
    ("http://localhost/hook", "loopback"),
    ("http://10.1.2.3/hook", "private"),
    ("http://192.168.0.10/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),   # cloud metadata
    ("http://[::1]:8080/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://[fd00:ec2::254]/hook", "private"),
    ("http://100.64.0.1/hook", "not a public address"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("ftp://example.com/hook", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("https://user:secret@example.com/hook", "credentials"),
    ("http:///hook", "no host"),
    ("http://no-such-host.invalid/hook", "cannot resolve"),
])
def test_refused_targets_are_422_naming_the_field(make_api_settings, registry, url, says):
    with TestClient(create_app(make_api_settings(webhook_secret="s"))) as client:
        answer = post(client, webhook_url=url)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == "webhook_url" and says in error["message"]


def test_a_public_target_is_accepted_and_private_ones_when_allowed(make_api_settings, registry):
    with TestClient(create_app(make_api_settings(webhook_secret="s"))) as client:
        assert post(client, webhook_url="https://93.184.216.34/hooks/star").status_code == 202
    with TestClient(create_app(make_api_settings(webhook_secret="s", webhook_allow_private=True))) as client:
        assert post(client, webhook_url="http://127.0.0.1:9/hook", webhook_events=["running", "final"]).status_code == 202
        # still never another scheme or credentials
        assert post(client, webhook_url="gopher://127.0.0.1/").status_code == 422
        assert post(client, webhook_url="http://a:b@127.0.0.1/").status_code == 422


@pytest.mark.parametrize("fields, field, says", [
    ({"webhook_events": ["final"]}, "webhook_events", "needs a `webhook_url`"),
    ({"webhook_url": "https://93.184.216.34/", "webhook_events": []}, "webhook_events", "each once"),
    ({"webhook_url": "https://93.184.216.34/", "webhook_events": ["final", "final"]}, "webhook_events", "each once"),
    ({"webhook_url": "https://93.184.216.34/", "webhook_events": ["done"]}, "webhook_events.0", "'running' or 'final'"),
    ({"webhook_url": "https://93.184.216.34/" + "x" * 2048}, "webhook_url", "2048"),
])
def test_webhook_fields_are_validated(make_api_settings, registry, fields, field, says):
    with TestClient(create_app(make_api_settings(webhook_secret="s"))) as client:
        answer = post(client, **fields)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == field and says in answer.json()["error"]["message"]


def test_without_a_secret_webhooks_are_refused_and_the_message_says_why(make_api_settings, registry):
    with TestClient(create_app(make_api_settings())) as client:
        answer = post(client, webhook_url="https://93.184.216.34/")
    assert answer.status_code == 422 and "STAR_WEBHOOK_SECRET" in answer.json()["error"]["message"]


def test_the_openai_route_takes_webhook_fields_in_its_extra_body(make_api_settings, registry):
    with TestClient(create_app(make_api_settings(webhook_secret="s"))) as client:
        answer = client.post("/v1/images/generations", json={"prompt": "a fox", "webhook_url": "http://10.0.0.1/"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "webhook_url" and "private" in answer.json()["error"]["message"]


def test_the_openapi_schema_describes_the_fields_the_wait_and_the_delivery(make_api_settings):
    with TestClient(create_app(make_api_settings(long_poll_max_s=45))) as client:
        schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"webhook_url", "webhook_events"} <= set(request)
    (wait,) = [p for p in schema["paths"]["/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "wait"]
    assert wait["in"] == "query" and wait["schema"]["anyOf"][0]["maximum"] == 45   # the setting's bound
    delivery = schema["webhooks"]["job-event"]["post"]
    assert {p["name"] for p in delivery["parameters"] if p["in"] == "header"} == {
        "star-event-id", "star-event", "star-signature"}
    body = delivery["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(schema["components"]["schemas"][body]["properties"]) == {"event_id", "event", "created_at", "job"}


@pytest.mark.parametrize("address, refused", [
    ("93.184.216.34", False), ("2606:2800:220:1:248:1893:25c8:1946", False), ("8.8.8.8", False),
    ("127.0.0.2", True), ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.1.1", True), ("169.254.169.254", True),
    ("100.64.1.1", True), ("224.0.0.1", True), ("255.255.255.255", True), ("::1", True), ("fe80::1%eth0", True),
    ("fc00::1", True), ("::ffff:10.0.0.1", True), ("::", True),
])
def test_what_counts_as_public(address, refused):
    assert (forbidden(address) is not None) == refused


def rebinding_resolver(*answers: str):
    """getaddrinfo stand-in answering each call with the next address (a rebinding DNS server)."""
    calls = iter(answers)

    def resolve(host, port, type=0):
        address = next(calls)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]
    return resolve


def test_a_delivery_connects_to_the_address_it_checked():
    resolver = rebinding_resolver("93.184.216.34", "127.0.0.1")
    target = resolve_target("https://hooks.example.com:8443/star?token=1#x", False, resolver)
    assert target.url == "https://93.184.216.34:8443/star?token=1"
    assert target.headers == {"Host": "hooks.example.com:8443"}
    assert target.extensions == {"sni_hostname": "hooks.example.com"}   # TLS is verified for the name
    with pytest.raises(TargetRefused, match="loopback"):   # the same name, rebound to loopback
        resolve_target("https://hooks.example.com:8443/star", False, resolver)
    ipv6 = resolve_target("http://v6.example.com/", False, rebinding_resolver("2606:2800:220:1:248:1893:25c8:1946"))
    assert ipv6.url == "http://[2606:2800:220:1:248:1893:25c8:1946]/" and ipv6.extensions == {}


def test_any_refused_address_among_several_refuses_the_name():
    def resolve(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("93.184.216.34", "10.0.0.7")]
    with pytest.raises(TargetRefused, match="10.0.0.7"):
        resolve_target("http://mixed.example.com/", False, resolve)
