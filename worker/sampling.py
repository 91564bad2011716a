"""The one place where the service's sampling vocabulary meets the model's.

The service names the sampling parameters as its API does (guidance_scale, top_k, top_p,
temperature: app.schemas) from the HTTP body to the job record, the PNG text chunks and the logs;
the model names guidance `cfg` (model.request.ImageRequest, a model directory's config.json
"sampling" block). MODEL_NAMES maps one to the other, in both directions here and nowhere else.
Fast guidance's guidance_stop_scale (a request field with a worker default, not a model
recommendation) is the model's cfg_stop_scale: OPTION_NAMES.
The sampler choice (`sampler`: auto, head or plain) has the same name and values on both sides;
a job's "auto" becomes what it runs ("head" where the model has a sampler head, else "plain") when
a worker starts it (`job_defaults`), as the sampling fields it left out become the model's values.
"""
from __future__ import annotations

from pydantic import ValidationError

from app.schemas import DEFAULT_SAMPLING, SAMPLING_FIELDS, GenerateRequest, allowed_range, image_seed
from model.request import ImageRequest, resolve_sampler

MODEL_NAMES = {"guidance_scale": "cfg", "top_k": "top_k", "top_p": "top_p", "temperature": "temperature"}
API_NAMES = {model: api for api, model in MODEL_NAMES.items()}
GUIDANCE_STOP = "guidance_stop_scale"
OPTION_NAMES = {GUIDANCE_STOP: "cfg_stop_scale"}   # optional fields: None (absent) keeps the model's default


def image_requests(params: dict) -> list[ImageRequest]:
    """The n model requests of one job (every sampling field filled): image i uses
    image_seed(seed, i), (seed + i) mod 2^32."""
    sampling = {MODEL_NAMES[name]: params[name] for name in SAMPLING_FIELDS}
    options = {model: params.get(api) for api, model in OPTION_NAMES.items()}
    return [ImageRequest(prompt=params["prompt"], seed=image_seed(params["seed"], i),
                         negative_prompt=params["negative_prompt"], sampler=params.get("sampler"), **sampling,
                         **options) for i in range(params["n"])]


def guidance_stop_default(stop: int | None, scales: int | None) -> int | None:
    """The worker's STAR_GUIDANCE_STOP_SCALE checked against its model's number of scales (ValueError
    says how to fix it; a pipeline that does not say how many scales it has is not checked)."""
    if stop is not None and scales is not None and not 0 <= stop <= scales:
        raise ValueError(f"STAR_GUIDANCE_STOP_SCALE={stop} is not a scale index of this model: it has {scales} "
                         f"scales, so use 0 to {scales} (or unset it for guidance on every scale)")
    return stop


def has_sampler_head(pipeline: object) -> bool:
    """Whether the pipeline's model has a sampler head (requests may ask for sampler "head")."""
    return bool(getattr(pipeline, "has_sampler_head", False))


def job_defaults(pipeline: object) -> dict:
    """What a started job's fields left out become (API names): the sampling defaults
    (`model_defaults`) and `sampler`, the one "auto" runs on this model ("head" or "plain")."""
    return {**model_defaults(pipeline), "sampler": resolve_sampler("auto", has_sampler_head(pipeline), "")}


def model_defaults(pipeline: object) -> dict:
    """The sampling defaults a loaded pipeline serves with, in API names: its model directory's
    recommendation (`pipeline.sampling`, model names, any subset) over DEFAULT_SAMPLING, checked
    against the request bounds (ValueError names the bad value)."""
    values = dict(DEFAULT_SAMPLING)
    for key, value in (getattr(pipeline, "sampling", None) or {}).items():
        if key not in API_NAMES:
            raise ValueError(f"unknown sampling default {key!r}; known: {sorted(API_NAMES)}")
        values[API_NAMES[key]] = value
    try:
        checked = GenerateRequest.model_validate({"prompt": "-", **values})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error.get("loc") else "?"
        raise ValueError(f"the model's sampling default {name}={values.get(name)!r} is invalid: {error['msg']} "
                         f"({allowed_range(name)})") from None
    return {name: getattr(checked, name) for name in SAMPLING_FIELDS}
