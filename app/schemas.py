"""Per-request parameters and response bodies of the HTTP API (pydantic).

The bounds declared here are the single source of the allowed ranges: validation uses them and
`allowed_range()` turns them into the text of a 422 message. Types are strict, as JSON has them: an
integer field takes only a JSON integer (not `true`, `"2"` or `128.0`), a number field a finite JSON
number (integers included; not NaN or Infinity), a text field a string. `-0.0` reads as 0.0.

Sampling fields (guidance_scale, top_k, top_p, temperature) left out of a request are None: the
worker that runs the job fills them once, when it starts the job, from its model's defaults (the
model directory's config.json "sampling" block over DEFAULT_SAMPLING, worker/sampling.py), and the
job then reports the values it used. These API names are the service's one sampling vocabulary.
So does `sampler`: "auto" (its default, declared here once) becomes "head" or "plain" when a
worker starts the job, as its model has a sampler head or not.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.lanes import Lane
from app.jobs.states import JobStatus

MAX_SEED = 2**32 - 1


def image_seed(seed: int, i: int) -> int:
    """The seed of image i of a request with `seed`: seed + i, wrapping past MAX_SEED to 0, so every
    reported seed is a valid request seed and (that seed, n=1) reproduces that image alone."""
    return (seed + i) % (MAX_SEED + 1)

SAMPLING_FIELDS = ("guidance_scale", "top_k", "top_p", "temperature")
# The service's sampling defaults, for models whose directory recommends none (presets, older
# directories, converted official weights): the official STAR sampling values (docs/model.md).
# model.request.OFFICIAL_SAMPLING is the same numbers under the model's names (tests/worker/test_units.py).
DEFAULT_SAMPLING: dict[str, float | int] = {"guidance_scale": 4.0, "top_k": 600, "top_p": 0.8, "temperature": 1.0}
MODEL_DEFAULT = " Default: the model's (GET /models), else {}."
MAX_SCALES = 64   # above any schedule; the model's own number of scales (GET /models `scales`) is checked on submit
GUIDANCE_STOP = ("Fast guidance (opt-in): the index of the first scale sampled without classifier-free guidance; "
                 "from it on only the conditional pass runs (about half the work of those scales; images may "
                 "follow the prompt less closely: docs/api.md). 0 to the model's number of scales (GET /models `scales`: "
                 "10 at 256 and 512 px, 14 at 1024 px); that number means guidance on every scale. Default: "
                 "the worker's STAR_GUIDANCE_STOP_SCALE (GET /models `guidance_stop_scale`), unset = guidance "
                 "on every scale (the official sampling).")
# How an image's late scales are sampled: model.request.SAMPLERS under the same names (kept equal by
# tests/worker/test_units.py). "auto": the sampler head where the model has one, else "plain".
Sampler = Literal["auto", "head", "plain"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
SAMPLER_HELP = ("Sampler: `auto` (the model's sampler head where it has one, else plain), `head` (causal-driven "
                "stable sampling; only models with a sampler head, see `sampler_head` in GET /models) or `plain` "
                "(every scale drawn at once).")


class GenerateRequest(BaseModel):
    """Body of `POST /generate`. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=2000, description="What to draw (CLIP reads the first 77 tokens).")
    negative_prompt: str = Field("", max_length=2000, description="What to steer away from (guidance's unconditional side).")
    size: int | None = Field(None, ge=64, le=4096, description="Image side in pixels, an integer (128, not "
                             "\"128x128\"); one of the sizes live workers serve (GET /models). Default: the largest served.")
    n: int = Field(1, ge=1, le=4, description="Number of images; image i uses seed (seed + i) mod 2^32.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; chosen by the server and reported when absent. Image i uses (seed + i) mod 2^32: each image's own seed is reported, and that seed with n=1 reproduces the image.")
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="Classifier-free guidance scale (ramped "
                                         "over the scales)." + MODEL_DEFAULT.format(DEFAULT_SAMPLING["guidance_scale"]))
    top_k: int | None = Field(None, ge=0, le=16384, description="Top-k sampling (0 = off)."
                              + MODEL_DEFAULT.format(DEFAULT_SAMPLING["top_k"]))
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling (0 = off)."
                                + MODEL_DEFAULT.format(DEFAULT_SAMPLING["top_p"]))
    temperature: float | None = Field(None, gt=0.0, le=5.0, description="Sampling temperature."
                                      + MODEL_DEFAULT.format(DEFAULT_SAMPLING["temperature"]))
    guidance_stop_scale: int | None = Field(None, ge=0, le=MAX_SCALES, description=GUIDANCE_STOP)
    sampler: Sampler = Field("auto", description=SAMPLER_HELP)
    priority: Lane = Field("normal", description="Lane of the job: workers take `high` jobs first, then `normal`, "
                           "then `low` (a lower lane's job still ends `expired` at its deadline). Which API keys "
                           "may use `high` is the setting STAR_HIGH_PRIORITY_KEYS (others get 403).")
    # webhooks (checked further by app.webhook_targets.check_webhook: scheme, credentials, public host)
    webhook_url: str | None = Field(None, max_length=2048, description="http(s) URL POSTed a signed JSON event "
                                    "when the job ends (docs/api.md#webhooks); its host must resolve to public "
                                    "addresses only.")
    webhook_events: list[Literal["running", "final"]] | None = Field(None, description="Events sent to "
                                                                     "`webhook_url`: [\"final\"] (the default: the "
                                                                     "job's end) or [\"running\", \"final\"] (also "
                                                                     "each start).")

    @field_validator("sampler", mode="before")
    @classmethod
    def _null_sampler_is_auto(cls, value: object) -> object:
        return "auto" if value is None else value   # null = left out, as for the sampling fields

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain non-whitespace text")
        return value

    @field_validator("guidance_scale", "top_p", "temperature")
    @classmethod
    def _no_negative_zero(cls, value: float | None) -> float | None:
        return None if value is None else value + 0.0   # -0.0 + 0.0 == +0.0: one zero in records and PNGs


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
    if get_origin(info.annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(info.annotation)))
    kinds: dict[type | None, str] = {int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(_base_type(info.annotation), "a value")
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


RESOLVED = "Null while the job is queued if the request left it out; once a worker starts the job, the value it uses."


class JobParameters(BaseModel):
    """The request as it runs: server-chosen seed and size filled in at once; sampling fields the
    request left out filled with the model's defaults when a worker starts the job."""

    prompt: str
    negative_prompt: str
    size: int
    n: int
    seed: int
    guidance_scale: float | None = Field(None, description=RESOLVED)
    top_k: int | None = Field(None, description=RESOLVED)
    top_p: float | None = Field(None, description=RESOLVED)
    temperature: float | None = Field(None, description=RESOLVED)
    guidance_stop_scale: int | None = Field(None, description="First scale without guidance (fast guidance); "
                                            "null: guidance on every scale. " + RESOLVED)
    sampler: Sampler = Field("auto", description="As requested while the job is queued; once a worker starts "
                             "it, the sampler it runs: `head` or `plain` (`auto` resolved for its model).")
    priority: Lane = Field("normal", description="The lane the job was queued in.")


class SamplingDefaults(BaseModel):
    """What a request that leaves the sampling fields out gets from this model."""

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


class Usage(BaseModel):
    """What jobs used (one succeeded job, or a key's jobs over a period)."""

    jobs: int = Field(1, description="Succeeded jobs counted.")
    images: int = Field(description="Images made.")
    pixels: int = Field(description="Pixels made: width x height, summed over the images.")
    model_s: float = Field(description="Model seconds: each job's share of the wall time of the model call it ran "
                           "in, split by images (the call's time x the job's images / the call's images).")


class KeyUsage(BaseModel):
    key: str = Field(description="The API key's name (`anonymous`: jobs of a server without API keys).")
    totals: Usage = Field(description="Since the key's first job.")
    days: dict[str, Usage] = Field(description="Per UTC day (YYYY-MM-DD) of the period asked, days with usage "
                                   "only, oldest first.")


class UsageReport(BaseModel):
    days: int = Field(description="The period covered by `days` of each key: this many UTC days, today included.")
    keys: list[KeyUsage] = Field(description="The caller's own key; for an admin key, every key with usage.")


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
    usage: Usage | None = Field(None, description="Once succeeded: what the job is charged (GET /usage).")
    error: JobError | None = None


class WebhookEvent(BaseModel):
    """The body of a webhook delivery (app.webhook_delivery, docs/api.md#webhooks)."""

    event_id: str = Field(description="Unique per event, the same on every retry of it: drop ids already handled.")
    event: Literal["running", "succeeded", "failed", "canceled", "expired"] = Field(
        description="`running` (a worker started the job) or the job's final status.")
    created_at: datetime = Field(description="When the event happened (UTC).")
    job: JobView = Field(description="The job as GET /jobs/{job_id} returned it when the event was first sent.")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class LaneOut(BaseModel):
    queue: str = Field(description="The lane's RQ queue.")
    queue_depth: int = Field(description="Jobs waiting in this lane.")
    oldest_wait_s: float = Field(description="How long the job at the front of this lane has waited (0: none waits).")


class ModelOut(BaseModel):
    name: str
    size: int
    queue: str = Field(description="The model's normal-lane RQ queue (`star-<model>`).")
    queue_depth: int = Field(description="Jobs waiting for this model, all lanes together.")
    lanes: dict[Lane, LaneOut] = Field(default_factory=dict, description="Depth and wait per lane: high, "
                                       "normal, low (workers take them in that order).")
    workers: int
    states: dict[str, int]
    max_batch: int
    sampling: SamplingDefaults | None = Field(None, description="The model's sampling defaults (null until a "
                                              "worker has loaded it).")
    scales: int | None = Field(None, description="Scales of the model's schedule: guidance_stop_scale goes from 0 "
                               "to this (null until a worker has loaded it).")
    guidance_stop_scale: int | None = Field(None, description="The workers' default first scale without "
                                            "guidance (STAR_GUIDANCE_STOP_SCALE); null: guidance on every scale.")
    example_prompts: list[str] = Field(default_factory=list, description="Prompts this model draws well, from "
                                       "its config.json (empty when it names none, or until a worker has loaded it).")
    sampler_head: bool | None = Field(None, description="Whether the model has a sampler head (causal-driven "
                                      "stable sampling): requests may ask for sampler `head`, and `auto` uses it. "
                                      "Null until a worker has loaded the model.")


class ModelsOut(BaseModel):
    models: list[ModelOut]
    sizes: list[int]
    default_size: int | None
