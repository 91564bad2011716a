"""Types of the STAR HTTP client: response records, errors and the retry policy (httpx + stdlib)."""
from __future__ import annotations

import email.utils
import os
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar, cast, overload

import httpx

DEFAULT_SERVER = "http://localhost:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "expired"})   # = app.jobs.states.FINAL (tests/layout)
T = TypeVar("T")


# ------------------------------------------------------------------------------ response types

@overload
def _parse(cls: type[T], data: dict[str, Any]) -> T: ...
@overload
def _parse(cls: type[T], data: dict[str, Any] | None) -> T | None: ...
def _parse(cls: type[T], data: dict[str, Any] | None) -> T | None:
    """A dataclass from a JSON object: known fields only (newer servers may add fields)."""
    if data is None:
        return None
    return cls(**{f.name: data[f.name] for f in fields(cast(Any, cls)) if f.name in data})


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class Progress:
    scale: int    # scales sampled so far (k of S)
    scales: int   # scales in the model's schedule (S)


@dataclass(frozen=True)
class ImageRef:
    url: str
    seed: int   # this image's own seed, (request seed + i) mod 2^32: with n=1 it reproduces the image
    width: int
    height: int


@dataclass(frozen=True)
class Timings:
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_wait_s: float | None = None
    model_s: float | None = None
    total_s: float | None = None


@dataclass(frozen=True)
class JobParameters:
    prompt: str
    negative_prompt: str
    size: int
    n: int
    seed: int
    # None while queued when the request left them out; once a worker starts the job, the values it
    # uses (the model's defaults for fields the request left out)
    guidance_scale: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    guidance_stop_scale: int | None = None    # fast guidance's first scale without guidance; None: every scale guided
    # auto, head or plain as asked while queued; once started, the one that runs: "head" or "plain"
    # (None from a server older than the sampler choice)
    sampler: str | None = None
    priority: str = "normal"     # the lane it was queued in: high, normal, low


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Usage:
    """What jobs used: one succeeded job (`Job.usage`), or a key's jobs over a period (GET /usage)."""

    images: int
    pixels: int
    model_s: float               # each job's share of its model call's time, split by images
    jobs: int = 1


@dataclass(frozen=True)
class KeyUsage:
    key: str
    totals: Usage                # since the key's first job
    days: dict[str, Usage]       # UTC day (YYYY-MM-DD) -> its usage, days with usage only


@dataclass(frozen=True)
class UsageReport:
    """`GET /usage`: the caller's key (an admin key: every key) over the last `days` UTC days."""

    days: int
    keys: tuple[KeyUsage, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UsageReport":
        return cls(days=data["days"], keys=tuple(
            KeyUsage(k["key"], _parse(Usage, k["totals"]), {d: _parse(Usage, u) for d, u in k["days"].items()})
            for k in data["keys"]))


@dataclass(frozen=True)
class Job:
    """`GET /jobs/{id}`: status, queue position or progress, timings, parameters, images or error."""

    id: str
    status: str                  # queued, running, succeeded, failed, canceled, expired
    model: str
    request: JobParameters
    timings: Timings
    queue_position: int | None = None
    progress: Progress | None = None
    cancel_requested: bool = False
    images: tuple[ImageRef, ...] = ()
    prompt_truncated: bool | None = None
    error: JobError | None = None
    usage: Usage | None = None   # once succeeded: what it is charged

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        timings = {k: _time(v) if k.endswith("_at") else v for k, v in (data.get("timings") or {}).items()}
        return cls(id=data["id"], status=data["status"], model=data.get("model", ""),
                   request=_parse(JobParameters, data["request"]), timings=_parse(Timings, timings),
                   queue_position=data.get("queue_position"), progress=_parse(Progress, data.get("progress")),
                   cancel_requested=bool(data.get("cancel_requested")),
                   images=tuple(_parse(ImageRef, i) for i in data.get("images") or ()),
                   prompt_truncated=data.get("prompt_truncated"), error=_parse(JobError, data.get("error")),
                   usage=_parse(Usage, data.get("usage")))


@dataclass(frozen=True)
class Accepted:
    """`POST /generate` (202): the job is queued."""

    id: str
    status_url: str
    status: str = "queued"
    queue_position: int | None = None


@dataclass(frozen=True)
class LaneInfo:
    queue: str
    queue_depth: int             # jobs waiting in this lane
    oldest_wait_s: float         # how long the job at its front has waited (0: none waits)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size: int
    queue: str
    queue_depth: int             # all lanes together
    workers: int
    states: dict[str, int]
    max_batch: int
    sampling: dict[str, float] | None = None   # the model's defaults: guidance_scale, top_k, top_p, temperature
    scales: int | None = None                  # scales of its schedule: guidance_stop_scale is 0 .. scales
    guidance_stop_scale: int | None = None     # the workers' default (STAR_GUIDANCE_STOP_SCALE); None: off
    lanes: dict[str, LaneInfo] | None = None   # high, normal, low (None from servers without lanes)
    sampler_head: bool | None = None   # the model has a sampler head (sampler "head"; "auto" uses it)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelInfo":
        lanes = data.get("lanes")
        info = _parse(cls, {k: v for k, v in data.items() if k != "lanes"})
        return info if lanes is None else replace(info, lanes={lane: _parse(LaneInfo, v) for lane, v in lanes.items()})


@dataclass(frozen=True)
class Models:
    models: tuple[ModelInfo, ...]
    sizes: tuple[int, ...]
    default_size: int | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Models":
        return cls(models=tuple(ModelInfo.from_json(m) for m in data.get("models", ())),
                   sizes=tuple(data.get("sizes", ())), default_size=data.get("default_size"))


@dataclass(frozen=True)
class GeneratedImage:
    url: str
    seed: int   # this image's own seed, (request seed + i) mod 2^32: with n=1 it reproduces the image
    width: int
    height: int
    png: bytes

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_bytes(self.png)
        return path


@dataclass(frozen=True)
class Generation:
    """What `generate` returns: the finished job and its PNGs, in order (image i has seed
    (seed + i) mod 2^32)."""

    job: Job
    images: tuple[GeneratedImage, ...]


# ------------------------------------------------------------------------------ errors

class StarError(Exception):
    """Base of every error this client raises."""


class StarConnectionError(StarError):
    """The server could not be reached (refused, DNS, network, read timeout)."""

    def __init__(self, server: str, reason: str):
        super().__init__(f"cannot reach the STAR server at {server}: {reason}")
        self.server, self.reason = server, reason


class StarHTTPError(StarError):
    """The server answered with an error status; `code`, `message` and `field` come from its body."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 retry_after: float | None = None, server: str = ""):
        super().__init__(f"{status} {code}: {message}" + (f" (server {server})" if server else ""))
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after, self.server = retry_after, server


class StarRequestError(StarHTTPError):
    """4xx other than 429: fix the request (never retried)."""


class StarBusyError(StarHTTPError):
    """429: the queue stayed full through every retry."""


class StarServerError(StarHTTPError):
    """5xx: the server failed or is unavailable (503 after every retry)."""


class StarTimeout(StarError):
    """`wait`/`generate` gave up before the job finished (the last view is `job`)."""

    def __init__(self, job: Job, timeout: float):
        super().__init__(f"job {job.id} still {job.status} after {timeout:g}s")
        self.job, self.timeout = job, timeout


class JobFailed(StarError):
    """`generate`: the job ended failed, canceled or expired."""

    def __init__(self, job: Job):
        detail = f": {job.error.code}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{detail}")
        self.job = job


def error_from_response(response: httpx.Response, server: str) -> StarHTTPError:
    try:
        body = response.json()
        detail = body["error"] if isinstance(body.get("error"), dict) else {}
    except (ValueError, AttributeError):
        detail = {}
    status = response.status_code
    code = detail.get("code") or detail.get("type") or f"http_{status}"
    message = detail.get("message") or response.text.strip()[:200] or response.reason_phrase
    cls = StarBusyError if status == 429 else StarServerError if status >= 500 else StarRequestError
    return cls(status, code, message, field=detail.get("field") or detail.get("param"),
               retry_after=retry_after_seconds(response), server=server)


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# ------------------------------------------------------------------------------ retries

@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5        # tries in all, the first one included
    max_total_s: float = 120.0   # no retry is started (or slept towards) beyond this since the first try
    backoff_s: float = 0.5       # without Retry-After: backoff_s * 2**(attempt-1), capped
    max_backoff_s: float = 10.0
    statuses: tuple[int, ...] = (429, 503)

    def _delay(self, attempt: int, elapsed: float, suggested: float | None) -> float | None:
        delay = suggested if suggested is not None else min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        if attempt >= self.max_attempts or elapsed + delay > self.max_total_s:
            return None
        return delay

    def after_response(self, response: httpx.Response, attempt: int, elapsed: float) -> float | None:
        """Seconds to sleep before trying again, or None to give up."""
        if response.status_code not in self.statuses:
            return None
        return self._delay(attempt, elapsed, retry_after_seconds(response))

    def after_error(self, method: str, attempt: int, elapsed: float) -> float | None:
        if method.upper() not in ("GET", "HEAD", "DELETE"):
            return None   # a POST may have been received: never resend it blindly
        return self._delay(attempt, elapsed, None)
