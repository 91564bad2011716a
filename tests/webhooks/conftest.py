"""Webhook tests' fixtures. `receiver`: a real HTTP webhook receiver, a threaded HTTP server on
loopback that records
every delivery (arrival time, path, headers, body) and answers by path:

    /ok/...       200
    /flaky/...    500 to the first two deliveries of each path, then 200
    /down/...     500 always
    /hang/...     holds the first delivery of each path without answering until `release()`, then 200

plus `verify` (fixture): a signature check written as a receiver would write it (docs/clients.md),
and `webhook_api_settings`: ApiSettings with webhooks on (loopback allowed, quick retries).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SECRET = "webhook-test-secret"


@dataclass
class Delivery:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or abs(time.time() - int(fields["t"])) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


class Receiver:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    earlier = sum(1 for d in receiver.deliveries if d.path == self.path)
                    receiver.deliveries.append(Delivery(time.time(), self.path, dict(self.headers), body))
                kind = self.path.split("/")[1]
                if kind == "hang" and earlier == 0:
                    receiver.released.wait(60)
                    return   # no answer: the connection just closes
                status = 500 if kind == "down" or (kind == "flaky" and earlier < 2) else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Receiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def release(self) -> None:
        self.released.set()

    def at(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.path == path]


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture(name="verify")
def verify_fixture():
    return verify


@pytest.fixture
def webhook_api_settings(make_api_settings):
    """ApiSettings with webhooks on, loopback targets allowed and quick retries, plus overrides."""
    def make(**overrides):
        values = dict(webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff_s=0.3,
                      webhook_max_backoff_s=2.0, webhook_max_age_s=60.0, webhook_timeout_s=5.0)
        return make_api_settings(**{**values, **overrides})
    return make
