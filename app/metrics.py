"""Prometheus metrics of the API process (GET /metrics).

What this process exports, and where each number comes from:
- star_api_requests_total{method, route, status}: counted here, per route template.
- star_api_request_seconds{method, route}: time to answer, measured here.
- star_queue_depth{model, lane}: read from Redis (LLEN of each model's lane queue) at scrape time.
- star_workers{model, state}: live workers from the Redis registry at scrape time.
- star_webhook_deliveries_total{outcome}: webhook delivery attempts made by this process
  (app.webhook_delivery): delivered, failed (retried later), gave_up (failed past
  STAR_WEBHOOK_MAX_AGE_S), refused (the target resolved to a refused address at delivery), gone
  (the job's record expired first). Sum across API replicas.
- star_webhook_pending: webhook events not yet delivered nor given up (the outbox), at scrape time.
- star_usage_jobs_total, star_usage_images_total, star_usage_pixels_total and
  star_usage_model_seconds_total, by {key}: what succeeded jobs used (app.jobs.usage), counted when
  scraped from the items finished jobs leave (as the histograms below: sum across replicas). The
  `key` label is the API key's name only for keys configured as `NAME:SHA256HEX` (else `unnamed`;
  `anonymous` without keys), so the label values are bounded by the configured names.
- star_job_latency_seconds{model, status} and star_job_queue_wait_seconds{model, lane}: observed here
  when scraped, from the timings each worker leaves in Redis as it finishes a job
  (app.jobs.finish). Every finished job is observed once by exactly one API replica,
  so sum the series across replicas. Jobs canceled while still queued never reach a worker and
  are not observed.
The workers export their own batch metrics on their own port (worker/metrics.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis import Redis

from app.jobs.read import all_queue_depths, drain_finished
from app.jobs.webhooks import pending as webhooks_pending
from app.jobs.workers import live_workers

LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
WEBHOOK_OUTCOMES = ("delivered", "failed", "gave_up", "refused", "gone")


class ApiMetrics:
    def __init__(self, usage_label: Callable[[str], str] = lambda name: "unnamed") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.usage_label = usage_label
        self.usage = {name: Counter(f"star_usage_{name}", help, ["key"], registry=r) for name, help in (
            ("jobs", "Succeeded jobs, by API key name."), ("images", "Images made, by API key name."),
            ("pixels", "Pixels made (width x height), by API key name."),
            ("model_seconds", "Model seconds (each job's share of its model call), by API key name."))}
        self.requests = Counter("star_api_requests", "HTTP requests answered.", ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("star_api_request_seconds", "Time to answer an HTTP request.",
                                         ["method", "route"], registry=r)
        self.queue_depth = Gauge("star_queue_depth", "Jobs waiting in a model's lane (high, normal, low).",
                                 ["model", "lane"], registry=r)
        self.workers = Gauge("star_workers", "Live workers by model and state.", ["model", "state"], registry=r)
        self.job_latency = Histogram("star_job_latency_seconds", "Enqueue to finish, per finished job.",
                                     ["model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("star_job_queue_wait_seconds", "Enqueue to start, per started job, by lane.",
                                    ["model", "lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.webhook_deliveries = Counter("star_webhook_deliveries", "Webhook delivery attempts by outcome.",
                                          ["outcome"], registry=r)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)
        self.webhook_pending = Gauge("star_webhook_pending", "Webhook events not yet delivered nor given up.",
                                     registry=r)

    def install(self, app: FastAPI) -> None:
        app.add_middleware(CountRequests, metrics=self)

    def count(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)

    def scrape(self, conn: Redis) -> bytes:
        """Refresh the Redis-backed series, then render everything."""
        self.queue_depth.clear()
        for (model, lane), depth in all_queue_depths(conn).items():
            self.queue_depth.labels(model, lane).set(depth)
        self.workers.clear()
        counts: dict[tuple[str, str], int] = {}
        for entry in live_workers(conn):
            counts[(entry.model, entry.state)] = counts.get((entry.model, entry.state), 0) + 1
        for (model, state), count in counts.items():
            self.workers.labels(model, state).set(count)
        self.webhook_pending.set(webhooks_pending(conn))
        for item in drain_finished(conn):
            if item.get("latency_s") is not None:
                self.job_latency.labels(item["model"], item["status"]).observe(item["latency_s"])
            if item.get("queue_wait_s") is not None:
                self.queue_wait.labels(item["model"], item.get("lane") or "normal").observe(item["queue_wait_s"])
            if item.get("usage"):
                self._count_usage(item["usage"])
        return generate_latest(self.registry)


    def _count_usage(self, used: dict) -> None:
        label = self.usage_label(used.get("key") or "anonymous")
        self.usage["jobs"].labels(label).inc()
        self.usage["images"].labels(label).inc(used["images"])
        self.usage["pixels"].labels(label).inc(used["pixels"])
        self.usage["model_seconds"].labels(label).inc(used["model_s"])


class CountRequests:
    """ASGI middleware: count and time every HTTP request by method, route template and status
    (a plain ASGI wrapper: Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:   # the router leaves the matched route in the (shared) scope
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.count(scope["method"], route, status, time.perf_counter() - started)
