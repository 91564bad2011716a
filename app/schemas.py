"""Per-request parameters and response bodies of the HTTP API (pydantic).

The bounds declared here are the single source of the allowed ranges: validation uses them and
`allowed_range()` turns them into the text of a 422 message.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**32 - 1
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]


class GenerateRequest(BaseModel):
    """Body of `POST /generate`. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=2000, description="What to draw (CLIP reads the first 77 tokens).")
    negative_prompt: str = Field("", max_length=2000, description="What to steer away from (guidance's unconditional side).")
    size: int | None = Field(None, ge=64, le=4096, description="Image side in pixels; one of the sizes live workers serve (GET /models). Default: the largest served.")
    n: int = Field(1, ge=1, le=4, description="Number of images; image i uses seed + i.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; chosen by the server and reported when absent.")
    guidance_scale: float = Field(4.0, ge=0.0, le=30.0, description="Classifier-free guidance scale (ramped over the scales).")
    top_k: int = Field(600, ge=0, le=16384, description="Top-k sampling (0 = off).")
    top_p: float = Field(0.8, ge=0.0, le=1.0, description="Nucleus sampling (0 = off).")
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="Sampling temperature.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain non-whitespace text")
        return value


def allowed_range(field: str) -> str | None:
    """Human text of a GenerateRequest field's bounds, e.g. 'an integer from 1 to 4'."""
    info = GenerateRequest.model_fields.get(field)
    if info is None:
        return None
    bounds: dict[str, object] = {}
    for item in info.metadata:  # annotated-types constraint objects (Ge, Le, MinLen, ...)
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    kind = {int: "an integer", float: "a number", str: "a string"}.get(_base_type(info.annotation), "a value")
    if "min_length" in bounds or "max_length" in bounds:
        return f"{kind} of {bounds.get('min_length', 0)} to {bounds.get('max_length')} characters"
    if "ge" in bounds and "le" in bounds:
        return f"{kind} from {bounds['ge']} to {bounds['le']}"
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    limits = [f"{words[name]} {bounds[name]}" for name in words if name in bounds]
    return f"{kind} " + " and ".join(limits) if limits else kind


def _base_type(annotation: object) -> type | None:
    for candidate in (int, float, str):
        if annotation is candidate or candidate in getattr(annotation, "__args__", ()):
            return candidate
    return None


class JobAccepted(BaseModel):
    id: str
    status: JobStatus = "queued"
    status_url: str
    queue_position: int | None = Field(None, description="Jobs ahead of this one in its queue (0 = next).")


class JobParameters(BaseModel):
    """The request as it will run: defaults applied, server-chosen seed and size filled in."""

    prompt: str
    negative_prompt: str
    size: int
    n: int
    seed: int
    guidance_scale: float
    top_k: int
    top_p: float
    temperature: float


class Progress(BaseModel):
    scale: int = Field(description="Scales sampled so far (k of S).")
    scales: int = Field(description="Scales in this model's schedule (S).")


class Timings(BaseModel):
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_wait_s: float | None = Field(None, description="started_at - queued_at")
    model_s: float | None = Field(None, description="Wall time of the model call this job was batched into.")
    total_s: float | None = Field(None, description="finished_at - queued_at")


class ImageOut(BaseModel):
    url: str
    seed: int
    width: int
    height: int


class JobError(BaseModel):
    code: str
    message: str


class JobView(BaseModel):
    id: str
    status: JobStatus
    model: str
    queue_position: int | None = None
    progress: Progress | None = None
    cancel_requested: bool = False
    timings: Timings
    request: JobParameters
    images: list[ImageOut] | None = None
    prompt_truncated: bool | None = Field(None, description="The prompt had more than 77 CLIP tokens.")
    error: JobError | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelOut(BaseModel):
    name: str
    size: int
    queue: str
    queue_depth: int
    workers: int
    states: dict[str, int]
    max_batch: int


class ModelsOut(BaseModel):
    models: list[ModelOut]
    sizes: list[int]
    default_size: int | None
