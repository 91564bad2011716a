"""What a pipeline is asked for and what it answers, without torch: `ImageRequest` (one image) and
`ImageResult`, shared by StarPipeline (model.pipeline re-exports them) and the worker's no-op
pipeline, and the official sampling values a request's unset fields fall back to.

The field names are the model's (cfg = classifier-free guidance scale); the service speaks its
API's names (guidance_scale) and maps them in one place (worker/sampling.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy

# The official STAR sampling values: what a request's unset field gets from a model that recommends
# none (presets, converted official weights). app.schemas.DEFAULT_SAMPLING holds the same numbers
# under the API's names (tests/worker/test_units.py keeps them equal).
OFFICIAL_SAMPLING: dict[str, float | int] = {"cfg": 4.0, "top_k": 600, "top_p": 0.8, "temperature": 1.0}
# ImageRequest.sampler: "auto" (the sampler head where the model has one, as the official code runs
# star-1024-sampler), "head" (causal-driven stable sampling; the model must have a head) or "plain".
SAMPLERS = ("auto", "head", "plain")


def resolve_sampler(sampler: str | None, has_sampler_head: bool, model: str) -> str:
    """"head" or "plain": what a request's sampler (None = "auto") runs on a model with or without a
    sampler head. ValueError for an unknown sampler, or "head" on a model without a head."""
    if sampler not in (None, *SAMPLERS):
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "head" and not has_sampler_head:
        raise ValueError(f"sampler 'head' needs a model with a sampler head; {model!r} has none "
                         "(use 'auto' or 'plain')")
    if sampler in (None, "auto"):
        return "head" if has_sampler_head else "plain"
    return sampler


@dataclass(frozen=True)
class ImageRequest:
    """One image; a job with n images becomes n of these, image i with seed (seed + i) mod 2^32
    (app.schemas.image_seed)."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    # None: the model's recommendation (StarPipeline.sampling, from config.json), else OFFICIAL_SAMPLING
    cfg: float | None = None           # guidance scale, ramped over scales: t = cfg * si / (S-1)
    top_k: int | None = None           # 0 = off
    top_p: float | None = None         # 0 = off
    temperature: float | None = None
    sampler: str | None = None         # None = "auto"; see SAMPLERS
    # fast guidance (opt-in): the index of the first scale sampled without guidance, from which on
    # the image runs its conditional row only (0 .. S; S or None: guided on every scale, the official
    # sampling). The ramp makes t = 0 at scale 0, so 0 and 1 give the same image.
    cfg_stop_scale: int | None = None


@dataclass
class ImageResult:
    image: numpy.ndarray | None     # uint8 [H, W, 3]; None when canceled
    prompt_truncated: bool          # the prompt had more than 77 CLIP tokens
    canceled: bool = False
