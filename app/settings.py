"""Process settings, read from `STAR_*` environment variables (pydantic-settings).

Three kinds of configuration are kept apart in this project: these process settings, the
architecture config (dataclasses in `model/`), and per-request parameters (`app/schemas.py`).
"""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Settings every process (API and worker) reads."""

    model_config = SettingsConfigDict(env_prefix="STAR_", extra="ignore")

    redis_url: str = Field("redis://localhost:6379/0", description="Redis holding the queues, jobs and worker registry.")
    storage_dir: Path = Field(Path("data/images"), description="Directory where PNGs are stored (shared by API and workers).")
    public_base_url: str = Field("http://localhost:8000", description="Base URL used to build image URLs returned to clients.")
    result_ttl_s: int = Field(86400, ge=1, description="How long a finished job and its record are kept (seconds).")
    failure_ttl_s: int = Field(86400, ge=1, description="How long a failed job is kept (seconds).")
    job_deadline_s: float = Field(600.0, gt=0, description="A job still queued after this many seconds ends as `expired`.")
    log_level: str = Field("INFO", description="Python logging level.")
    worker_deadline_s: float = Field(30.0, gt=0, description="A worker silent this long is presumed dead: its registry "
                                     "entry expires and its running jobs are re-queued (must exceed STAR_HEARTBEAT_S).")
    max_requeues: int = Field(2, ge=0, description="How many times a job whose worker died is re-queued before it "
                              "fails with `worker_lost`.")


class ApiSettings(CommonSettings):
    """Settings of `star api`."""

    host: str = Field("127.0.0.1", description="Interface the API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    queue_limit: int = Field(1000, ge=1, description="Queued jobs per model above which POST /generate answers 429.")
    retry_after_s: int = Field(5, ge=1, description="`Retry-After` seconds sent with a 429 (queue full).")
    image_max_age_s: int = Field(31536000, ge=0, description="`Cache-Control: max-age` of served PNGs (they never change).")
    api_keys: SecretStr | None = Field(None, description="API keys, comma-separated: plaintext keys, or `NAME:SHA256HEX` "
                                       "entries (see docs/reliability.md). No keys anywhere: no authentication.")
    api_keys_file: Path | None = Field(None, description="File of API keys, one per line (`NAME:SHA256HEX` or a "
                                       "plaintext key; `#` comments).")
    rate_limit_per_min: int = Field(0, ge=0, description="Requests per minute per API key (0: no limit); "
                                    "counted in Redis, so it holds across API replicas.")
    max_concurrent_jobs_per_key: int = Field(0, ge=0, description="Queued plus running jobs per API key (0: no limit).")
    max_body_bytes: int = Field(65536, ge=1024, description="Largest request body; a larger one is refused with 413.")
    max_prompt_chars: int = Field(2000, ge=1, le=2000, description="Longest prompt (and negative prompt), in characters.")
    url_signing_key: SecretStr | None = Field(None, description="Secret that signs image URLs (`?expires=&sig=`); "
                                              "unset: plain unguessable URLs.")
    url_ttl_s: int = Field(3600, ge=60, description="How long a signed image URL stays valid (seconds).")

    reaper_s: float = Field(10.0, ge=0, description="How often the API also runs the reaper (re-queues the running "
                            "jobs of dead workers), so they do not stay `running` when no worker of their model is "
                            "left to do it; 0: only workers reap.")
    worker_cache_s: float = Field(1.0, ge=0, description="How long POST /generate reuses the live-worker registry it "
                                  "read to pick a model (0: read it for every request). A size no cached worker "
                                  "serves is always re-read.")
    events_poll_s: float = Field(0.5, gt=0, description="How often an event stream (GET /jobs/{id}/events) re-reads "
                                 "its job in Redis.")
    events_heartbeat_s: float = Field(15.0, gt=0, description="Longest silence on an event stream before a "
                                      "`: ping` comment.")
    openai_timeout_s: float = Field(300.0, gt=0, description="How long POST /v1/images/generations waits for its "
                                    "job (then 504, and the job is canceled).")
    openai_poll_s: float = Field(0.25, gt=0, description="How often a waiting POST /v1/images/generations re-reads "
                                 "its job.")

class WorkerSettings(CommonSettings):
    """Settings of `star worker`."""

    model: str = Field("shapes", description="Model directory (converted weights), the name of a model shipped in "
                       "`model/zoo` (`shapes`: the 128 px demo model), a preset name such as `tiny` (random "
                       "weights), or `noop[:SIZE[:SCALE_MS]]` (flat grey images, for service benchmarks).")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: str = Field("auto", description="`auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16` or `float16`.")
    max_batch: int = Field(8, ge=1, description="Most images run in one model call (a request with n images counts n).")
    max_wait_ms: int = Field(50, ge=0, description="How long the worker waits for more jobs to fill a batch.")
    heartbeat_s: float = Field(10.0, gt=0, description="Worker heartbeat period.")
    metrics_host: str = Field("127.0.0.1", description="Interface the worker's Prometheus /metrics listens on "
                              "(the container images set 0.0.0.0: Prometheus scrapes them over the network).")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Base port of the worker's Prometheus /metrics: a "
                              "worker on `cuda:N` listens on this port + N, so one worker per GPU on a host needs "
                              "no setting (0 disables).")
    name: str | None = Field(None, description="Worker name (default: host + pid).")
    warmup: bool = Field(True, description="Run one small generation after loading, before taking jobs.")
    encode_threads: int = Field(2, ge=1, description="Threads encoding and storing PNGs off the model's critical path.")
    trust_pickle: bool = Field(False, description="Allow loading pickled checkpoints (only files you trust).")
    drain_grace_s: float = Field(90.0, gt=0, description="After SIGTERM, how long the batch in progress may run "
                                 "before its jobs are put back on the queue and the worker exits.")
    max_batch_auto: bool = Field(False, description="On CUDA, size the max batch from the free GPU memory after "
                                 "loading (model/memory.py) instead of STAR_MAX_BATCH, and reserve its KV cache.")
    memory_margin: float = Field(0.1, ge=0, lt=1, description="Fraction of the free GPU memory that "
                                 "STAR_MAX_BATCH_AUTO leaves unused.")
    compile: bool = Field(False, description="torch.compile the per-scale step for batch-size buckets (powers of two "
                          "up to the max batch) and compile them all at start (minutes; CUDA).")

    @model_validator(mode="after")
    def _deadline_after_heartbeat(self) -> "WorkerSettings":
        if self.worker_deadline_s <= self.heartbeat_s:
            raise ValueError(f"worker_deadline_s ({self.worker_deadline_s}) must exceed "
                             f"heartbeat_s ({self.heartbeat_s})")
        return self

    @model_validator(mode="after")
    def _metrics_port_in_range(self) -> "WorkerSettings":
        if self.metrics_listen_port > 65535:
            raise ValueError(f"metrics port {self.metrics_port} + device index of {self.device!r} is above 65535: "
                             "lower STAR_METRICS_PORT")
        return self

    @property
    def metrics_listen_port(self) -> int:
        """The port this worker's /metrics listens on (0: none)."""
        return worker_metrics_port(self.metrics_port, self.device)


def worker_metrics_port(base: int, device: str) -> int:
    """The metrics port rule: `base` + N for device `cuda:N` (`base` for cpu, auto, cuda); 0 stays 0.

    One worker per GPU on one host (`--device cuda:N`) then gets its own port with no setting; inside
    a container each worker sees its GPU as cuda:0 and listens on `base`.
    """
    match = re.fullmatch(r"\s*cuda:(\d+)\s*", device)
    return base + int(match.group(1)) if base and match else base
