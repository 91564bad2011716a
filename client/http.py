"""Python client of the STAR HTTP API: `StarClient` (sync) and `AsyncStarClient` (asyncio).

    with StarClient("http://localhost:8000") as star:
        result = star.generate("a red circle on a blue background", n=2, seed=7)
        for image in result.images:
            image.save(f"circle-{image.seed}.png")

Only httpx and the standard library (the `client` extra): no FastAPI, no torch.

Retries: 429 (queue full) and 503 (no worker, Redis down) are retried after the server's
`Retry-After` (else an exponential backoff), within `RetryPolicy.max_attempts` and
`max_total_s`; no other 4xx is ever retried. GET and DELETE are also retried after network
errors; POST is not (the request may have reached the server). Retrying a POST after a 429/503 is
safe because the server refused it before queueing anything, and each `submit` creates a fresh
job; every `submit` sends one `Idempotency-Key` (the same on its retries), so a retry the server
had in fact accepted returns the first job instead of queueing a second one.

Waiting (client.waiting): `wait` long-polls (`GET /jobs/{id}?wait=S`: one request answered when the
job ends) unless it reports progress, which comes from the job's event stream.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from client.types import (
    DEFAULT_SERVER, TERMINAL_STATUSES, _parse, Progress, ImageRef, Timings, JobParameters, JobError,
    Job, Accepted, ModelInfo, LaneInfo, Models, Usage, KeyUsage, UsageReport, GeneratedImage, Generation, StarError, StarConnectionError,
    StarHTTPError, StarRequestError, StarBusyError, StarServerError, StarTimeout, JobFailed,
    error_from_response, retry_after_seconds, RetryPolicy)
from client.waiting import LONG_POLL_S, wait_async, wait_sync


__all__ = ["StarClient", "AsyncStarClient", "ProgressCallback", "DEFAULT_SERVER",
           "TERMINAL_STATUSES", "Progress", "ImageRef", "Timings", "JobParameters", "JobError",
           "Job", "Accepted", "ModelInfo", "LaneInfo", "Models", "Usage", "KeyUsage", "UsageReport", "GeneratedImage", "Generation", "StarError",
           "StarConnectionError", "StarHTTPError", "StarRequestError", "StarBusyError",
           "StarServerError", "StarTimeout", "JobFailed", "error_from_response",
           "retry_after_seconds", "RetryPolicy"]

# ------------------------------------------------------------------------------ shared plumbing

ProgressCallback = Callable[[Job], Any]


class _Base:
    timeout: float

    def __init__(self, server: str | None, api_key: str | None, retry: RetryPolicy | None):
        self.server = (server or os.environ.get("STAR_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("STAR_API_KEY") or None
        self.retry = retry or RetryPolicy()
        self.long_poll_s = LONG_POLL_S   # the longest `wait` asked of GET /jobs/{id} (client.waiting)

    def _headers(self, url: str) -> dict[str, str]:
        """The API key goes to our server only, never to another host an image URL may name."""
        same_origin = not url.startswith(("http://", "https://")) or url.startswith(self.server + "/")
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key and same_origin else {}

    @staticmethod
    def _body(prompt: str, **options: Any) -> dict[str, Any]:
        events = options.get("webhook_events")
        if isinstance(events, str):
            options["webhook_events"] = [events]
        return {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}

    def _job_request(self, job_id: str, wait: float | None) -> dict[str, Any]:
        """The GET /jobs/{id} request: with `wait`, a long-poll whose read may take that much longer."""
        if not wait:
            return {"url": f"/jobs/{job_id}"}
        return {"url": f"/jobs/{job_id}", "params": {"wait": round(wait, 3)},
                "timeout": httpx.Timeout(self.timeout, read=self.timeout + wait)}

    def _fail(self, exc: httpx.TransportError) -> StarConnectionError:
        return StarConnectionError(self.server, str(exc) or type(exc).__name__)

    @staticmethod
    def _images(job: Job, pngs: list[bytes]) -> Generation:
        return Generation(job, tuple(GeneratedImage(i.url, i.seed, i.width, i.height, png)
                                     for i, png in zip(job.images, pngs)))


# ------------------------------------------------------------------------------ sync client

class StarClient(_Base):
    """Blocking client. `server` defaults to $STAR_SERVER or http://localhost:8000, `api_key` to
    $STAR_API_KEY (sent as `Authorization: Bearer ...`)."""

    def __init__(self, server: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None):
        super().__init__(server, api_key, retry)
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.server, timeout=timeout, transport=transport,
                                  headers={"User-Agent": "star-client/0.1"})
        self._sleep = time.sleep

    def __enter__(self) -> "StarClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        headers = {**self._headers(url), **kwargs.pop("headers", {})}
        while True:
            attempt += 1
            try:
                response = self._http.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                delay = self.retry.after_error(method, attempt, time.monotonic() - started)
                if delay is None:
                    raise self._fail(exc) from exc
            else:
                if response.is_success:
                    return response
                delay = self.retry.after_response(response, attempt, time.monotonic() - started)
                if delay is None:
                    raise error_from_response(response, self.server)
            self._sleep(delay)

    def submit(self, prompt: str, *, negative_prompt: str | None = None, size: int | None = None,
               n: int | None = None, seed: int | None = None, guidance_scale: float | None = None,
               top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
               guidance_stop_scale: int | None = None, sampler: str | None = None, priority: str | None = None,
               webhook_url: str | None = None, webhook_events: list[str] | None = None) -> Accepted:
        """Queue a request (`POST /generate`); None means the server's default. guidance_stop_scale:
        fast guidance, the first scale sampled without guidance (docs/api.md, "Fast guidance").
        sampler: "auto", "head" (the model's sampler head; 422 for a model without one) or "plain".
        `priority`: `high`, `normal` (the server's default) or `low` (the job's lane; `high` only for
        the API keys the server allows, else StarRequestError 403 `priority_not_allowed`).
        `webhook_url`: the server POSTs a signed event there when the job ends (and when it starts,
        with `webhook_events=["running", "final"]`)."""
        body = self._body(prompt, negative_prompt=negative_prompt, size=size, n=n, seed=seed,
                          guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature,
                          guidance_stop_scale=guidance_stop_scale, sampler=sampler, priority=priority,
                          webhook_url=webhook_url,
                          webhook_events=webhook_events)
        response = self._request("POST", "/generate", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        return _parse(Accepted, response.json())

    def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """`GET /jobs/{id}`; with `wait` (seconds, at most the server's STAR_LONG_POLL_MAX_S, 60 by
        default) the server answers when the job ends or after `wait` seconds."""
        return Job.from_json(self._request("GET", **self._job_request(job_id, wait)).json())

    def cancel(self, job_id: str) -> Job:
        """`DELETE /jobs/{id}`: queued jobs end at once, running ones at their next scale."""
        return Job.from_json(self._request("DELETE", f"/jobs/{job_id}").json())

    def models(self) -> Models:
        return Models.from_json(self._request("GET", "/models").json())

    def usage(self, *, days: int = 30, key: str | None = None) -> UsageReport:
        """`GET /usage`: this key's usage (an admin key: every key's, or `key`'s) over `days` UTC days."""
        params: dict[str, Any] = {"days": days, **({"key": key} if key else {})}
        return UsageReport.from_json(self._request("GET", "/usage", params=params).json())

    def download(self, image: ImageRef | str) -> bytes:
        """The PNG; follows the API's redirect to an S3 store (httpx drops the API key across origins)."""
        return self._request("GET", image if isinstance(image, str) else image.url, follow_redirects=True).content

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
             on_progress: ProgressCallback | None = None) -> Job:
        """Until the job is finished (any terminal status; nothing is raised for `failed`): long-polls,
        or with `on_progress` the job's event stream, calling `on_progress(job)` whenever status,
        queue position or progress changes (client.waiting). `poll_s`: the polling interval when
        the server holds no long-poll or the stream breaks. StarTimeout after `timeout`."""
        return wait_sync(self, job_id, timeout, poll_s, on_progress)

    def generate(self, prompt: str, *, timeout: float | None = None, poll_s: float = 0.5,
                 on_progress: ProgressCallback | None = None, **options: Any) -> Generation:
        """submit + wait + download. Raises JobFailed unless the job succeeded. If the wait ends
        early (timeout, Ctrl-C), the job is canceled before the exception propagates."""
        accepted = self.submit(prompt, **options)
        try:
            job = self.wait(accepted.id, timeout=timeout, poll_s=poll_s, on_progress=on_progress)
        except BaseException:
            self._cancel_quietly(accepted.id)
            raise
        if job.status != "succeeded":
            raise JobFailed(job)
        return self._images(job, [self.download(image) for image in job.images])

    def _cancel_quietly(self, job_id: str) -> None:
        try:
            self.cancel(job_id)
        except StarError:
            pass


# ------------------------------------------------------------------------------ async client

class AsyncStarClient(_Base):
    """The asyncio twin of StarClient (same methods, awaitable). `on_progress` may be a plain
    function or a coroutine function."""

    def __init__(self, server: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(server, api_key, retry)
        self.timeout = timeout
        self._http = httpx.AsyncClient(base_url=self.server, timeout=timeout, transport=transport,
                                       headers={"User-Agent": "star-client/0.1"})
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def __aenter__(self) -> "AsyncStarClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        headers = {**self._headers(url), **kwargs.pop("headers", {})}
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                delay = self.retry.after_error(method, attempt, time.monotonic() - started)
                if delay is None:
                    raise self._fail(exc) from exc
            else:
                if response.is_success:
                    return response
                delay = self.retry.after_response(response, attempt, time.monotonic() - started)
                if delay is None:
                    raise error_from_response(response, self.server)
            await self._sleep(delay)

    async def submit(self, prompt: str, *, negative_prompt: str | None = None, size: int | None = None,
                     n: int | None = None, seed: int | None = None, guidance_scale: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
                     guidance_stop_scale: int | None = None, sampler: str | None = None,
                     priority: str | None = None, webhook_url: str | None = None,
                     webhook_events: list[str] | None = None) -> Accepted:
        body = self._body(prompt, negative_prompt=negative_prompt, size=size, n=n, seed=seed,
                          guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature,
                          guidance_stop_scale=guidance_stop_scale, sampler=sampler, priority=priority,
                          webhook_url=webhook_url,
                          webhook_events=webhook_events)
        response = await self._request("POST", "/generate", json=body,
                                       headers={"Idempotency-Key": uuid.uuid4().hex})
        return _parse(Accepted, response.json())

    async def get(self, job_id: str, *, wait: float | None = None) -> Job:
        return Job.from_json((await self._request("GET", **self._job_request(job_id, wait))).json())

    async def cancel(self, job_id: str) -> Job:
        return Job.from_json((await self._request("DELETE", f"/jobs/{job_id}")).json())

    async def models(self) -> Models:
        return Models.from_json((await self._request("GET", "/models")).json())

    async def usage(self, *, days: int = 30, key: str | None = None) -> UsageReport:
        params: dict[str, Any] = {"days": days, **({"key": key} if key else {})}
        return UsageReport.from_json((await self._request("GET", "/usage", params=params)).json())

    async def download(self, image: ImageRef | str) -> bytes:
        """The PNG; follows the API's redirect to an S3 store (httpx drops the API key across origins)."""
        url = image if isinstance(image, str) else image.url
        return (await self._request("GET", url, follow_redirects=True)).content

    async def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
                   on_progress: ProgressCallback | None = None) -> Job:
        return await wait_async(self, job_id, timeout, poll_s, on_progress)

    async def generate(self, prompt: str, *, timeout: float | None = None, poll_s: float = 0.5,
                       on_progress: ProgressCallback | None = None, **options: Any) -> Generation:
        accepted = await self.submit(prompt, **options)
        try:
            job = await self.wait(accepted.id, timeout=timeout, poll_s=poll_s, on_progress=on_progress)
        except BaseException:   # also asyncio.CancelledError: the job is not left running
            await asyncio.shield(self._cancel_quietly(accepted.id))
            raise
        if job.status != "succeeded":
            raise JobFailed(job)
        pngs = await asyncio.gather(*(self.download(image) for image in job.images))
        return self._images(job, list(pngs))

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self.cancel(job_id)
        except StarError:
            pass
