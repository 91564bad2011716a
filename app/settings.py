"""Process settings, read from `STAR_*` environment variables (pydantic-settings): those every
process reads (`CommonSettings`) and the API's (`ApiSettings`); the worker's are in worker/settings.py.

Three kinds of configuration are kept apart in this project: these process settings, the
architecture config (dataclasses in `model/`), and per-request parameters (`app/schemas.py`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Settings every process (API and worker) reads."""

    model_config = SettingsConfigDict(env_prefix="STAR_", extra="ignore")

    redis_url: str = Field("redis://localhost:6379/0", description="Redis holding the queues, jobs and worker registry.")
    storage_dir: Path = Field(Path("data/images"), description="Directory where PNGs are stored (shared by API and workers).")
    storage_url: str | None = Field(None, description="`s3://BUCKET[/PREFIX]`: store PNGs in an S3-compatible "
                                    "bucket instead of STAR_STORAGE_DIR (workers upload, clients get presigned "
                                    "URLs; docs/deploy.md). Needs the `s3` extra.")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint of MinIO, R2 or another S3-compatible "
                                        "store (default: AWS_ENDPOINT_URL_S3, else AWS S3 of the region).")
    s3_region: str | None = Field(None, description="Region of the bucket (default: AWS_REGION, "
                                  "AWS_DEFAULT_REGION or the AWS config; `auto` for R2).")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="`path` (ENDPOINT/BUCKET/KEY: MinIO and most self-hosted stores), `virtual` "
        "(BUCKET.ENDPOINT/KEY) or `auto` (boto3 chooses).")
    public_base_url: str = Field("http://localhost:8000", description="Base URL used to build image URLs returned to clients.")
    result_ttl_s: int = Field(86400, ge=1, description="How long a finished job and its record are kept (seconds).")
    failure_ttl_s: int = Field(86400, ge=1, description="How long a failed job is kept (seconds).")
    job_deadline_s: float = Field(600.0, gt=0, description="A job still queued after this many seconds ends as `expired`.")
    log_level: str = Field("INFO", description="Python logging level.")
    worker_deadline_s: float = Field(30.0, gt=0, description="A worker silent this long is presumed dead: its registry "
                                     "entry expires and its running jobs are re-queued (must exceed STAR_HEARTBEAT_S).")
    max_requeues: int = Field(2, ge=0, description="How many times a job whose worker died is re-queued before it "
                              "fails with `worker_lost`.")

    @field_validator("storage_url", "s3_endpoint_url", "s3_region")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("storage_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None:
            from app.storage_s3 import S3Location   # no boto3 needed to check the URL

            S3Location.parse(value)
        return value


class ApiSettings(CommonSettings):
    """Settings of `star api`."""

    host: str = Field("127.0.0.1", description="Interface the API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    queue_limit: int = Field(1000, ge=1, description="Queued jobs per model above which POST /generate answers 429.")
    retry_after_s: int = Field(5, ge=1, description="`Retry-After` seconds sent with a 429 (queue full, too many jobs) and a 503 `no_worker`.")
    image_max_age_s: int = Field(31536000, ge=0, description="`Cache-Control: max-age` of served PNGs (they never change).")
    api_keys: SecretStr | None = Field(None, description="API keys, comma-separated: plaintext keys, or `NAME:SHA256HEX` "
                                       "entries (see docs/reliability.md). No keys anywhere: no authentication.")
    api_keys_file: Path | None = Field(None, description="File of API keys, one per line (`NAME:SHA256HEX` or a "
                                       "plaintext key; `#` comments).")
    admin_api_keys: SecretStr | None = Field(None, description="Admin API keys, comma-separated, in the format of "
                                             "STAR_API_KEYS: keys like the others that may also read, follow and "
                                             "cancel every key's jobs (other keys see only their own).")
    rate_limit_per_min: int = Field(0, ge=0, description="Requests per minute per API key (0: no limit); "
                                    "counted in Redis, so it holds across API replicas.")
    max_concurrent_jobs_per_key: int = Field(0, ge=0, description="Queued plus running jobs per API key (0: no limit).")
    high_priority_keys: str = Field("", description="API key names allowed `priority: high`, comma-separated "
                                    "(`*`: every caller, also with authentication off); others get 403. Empty: "
                                    "nobody.")
    max_body_bytes: int = Field(65536, ge=1024, description="Largest request body; a larger one is refused with 413.")
    max_prompt_chars: int = Field(2000, ge=1, le=2000, description="Longest prompt (and negative prompt), in characters.")
    url_signing_key: SecretStr | None = Field(None, description="Secret that signs image URLs (`?expires=&sig=`); "
                                              "unset: plain unguessable URLs.")
    url_ttl_s: int = Field(3600, ge=60, description="How long a signed image URL stays valid (seconds); with S3 "
                           "storage, also a presigned one (at most 604800, 7 days).")
    s3_urls: Literal["auto", "presigned", "redirect"] = Field(
        "auto", description="With STAR_STORAGE_URL: `presigned` (image URLs are presigned GET URLs of the store, "
        "valid STAR_URL_TTL_S), `redirect` (image URLs are the API's /images/ID.png, signed when "
        "STAR_URL_SIGNING_KEY is set, answering 307 to a presigned URL), `auto` (redirect when "
        "STAR_URL_SIGNING_KEY is set, else presigned).")
    s3_redirect_ttl_s: int = Field(300, ge=1, le=604800, description="How long the presigned URL that GET "
                                   "/images redirects to stays valid (seconds).")
    s3_public_endpoint_url: str | None = Field(None, description="Endpoint written into presigned URLs when "
                                               "clients reach the store at another address than the API "
                                               "(e.g. MinIO inside a cluster; default: STAR_S3_ENDPOINT_URL).")

    reaper_s: float = Field(10.0, ge=0, description="How often the API also runs the reaper (re-queues the running "
                            "jobs of dead workers, records queued jobs past their deadline as expired), so they do "
                            "not stay `running` or queued when no worker of their model is left to do it; 0: only "
                            "workers reap.")
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

    # ---- long-poll (GET /jobs/{id}?wait=S) and webhooks (app/longpoll.py, app/webhook_delivery.py)
    long_poll_max_s: int = Field(60, ge=1, le=600, description="Largest `wait` of GET /jobs/{id}?wait=S (seconds); "
                                 "a larger one is refused with 422.")
    webhook_secret: SecretStr | None = Field(None, description="Secret that signs webhook deliveries "
                                             "(HMAC-SHA256, header Star-Signature); unset: `webhook_url` is refused "
                                             "with 422 and no events are delivered.")
    webhook_allow_private: bool = Field(False, description="Allow webhook targets on loopback, private, link-local "
                                        "and other non-public addresses (refused by default, at submission and at "
                                        "every delivery).")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="How long one webhook delivery attempt may take "
                                     "(connect, send, answer).")
    webhook_backoff_s: float = Field(2.0, gt=0, description="Wait before the first retry of a failed webhook "
                                     "delivery; it doubles after each further failure.")
    webhook_max_backoff_s: float = Field(300.0, gt=0, description="Longest wait between two webhook delivery "
                                         "attempts.")
    webhook_max_age_s: float = Field(3600.0, gt=0, le=7 * 86400, description="How long after its event a webhook "
                                     "is retried; after that it is given up.")
    webhook_concurrency: int = Field(16, ge=0, description="Webhook deliveries this API process makes at once "
                                     "(0: this process delivers none; other API processes do).")

    @field_validator("s3_public_endpoint_url")
    @classmethod
    def _empty_endpoint_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def image_urls(self) -> Literal["local", "presigned", "redirect"]:
        """What image URLs clients get: the API's for local storage; for S3, STAR_S3_URLS resolved."""
        if not self.storage_url:
            return "local"
        if self.s3_urls == "auto":
            return "redirect" if self.url_signing_key else "presigned"
        return self.s3_urls

    @model_validator(mode="after")
    def _s3_urls_consistent(self) -> "ApiSettings":
        if self.image_urls == "presigned" and self.url_signing_key:
            raise ValueError("STAR_S3_URLS=presigned hands out the store's own presigned URLs, so "
                             "STAR_URL_SIGNING_KEY would sign nothing: unset it, or use STAR_S3_URLS=redirect")
        if self.image_urls == "presigned" and self.url_ttl_s > 604800:
            raise ValueError(f"url_ttl_s ({self.url_ttl_s}) is above 604800: presigned S3 URLs live at most 7 days")
        return self


def allowed_high_priority(setting: str, key_name: str) -> bool:
    """Whether the caller `key_name` may queue `high` jobs under STAR_HIGH_PRIORITY_KEYS."""
    names = {name.strip() for name in setting.split(",") if name.strip()}
    return "*" in names or key_name in names


def worker_metrics_port(base: int, device: str) -> int:
    """The metrics port rule: `base` + N for device `cuda:N` (`base` for cpu, auto, cuda); 0 stays 0.

    One worker per GPU on one host (`--device cuda:N`) then gets its own port with no setting; inside
    a container each worker sees its GPU as cuda:0 and listens on `base`.
    """
    match = re.fullmatch(r"\s*cuda:(\d+)\s*", device)
    return base + int(match.group(1)) if base and match else base
