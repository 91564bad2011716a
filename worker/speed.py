"""Speed settings applied once the model is loaded, before the worker takes jobs:

- STAR_MAX_BATCH_AUTO: on CUDA, the max batch is what fits in the free GPU memory (model/memory.py:
  KV cache and activations per image, the decoder's working memory, a safety margin of
  STAR_MEMORY_MARGIN); the KV cache for that batch is reserved at once.
- STAR_COMPILE: torch.compile the per-scale step with batch-size buckets (model/compile.py) and
  compile every bucket now (the state stays `starting` meanwhile).

Neither imports torch unless asked for, so the noop model stays torch-free.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def auto_max_batch(pipeline, free_bytes: int, margin: float) -> int:
    """Most images per batch that fit in free_bytes (read after loading) with the margin kept."""
    from model.memory import plan_for_pipeline

    plan = plan_for_pipeline(pipeline)
    n = plan.max_batch(free_bytes, margin)
    if n < 1:
        raise RuntimeError(f"not enough free GPU memory for one image: {free_bytes / 2**30:.1f} GiB free, "
                           f"{(plan.per_image_bytes + plan.decode_bytes) / 2**30:.1f} GiB needed "
                           f"(+{margin:.0%} margin)")
    return n


def prepare_model(settings, pipeline):
    """The settings to serve with (max_batch possibly sized from memory); compiles when asked."""
    if not (settings.compile or settings.max_batch_auto):
        return settings
    from worker.noop import NoopPipeline

    if isinstance(pipeline, NoopPipeline):
        log.info("STAR_COMPILE / STAR_MAX_BATCH_AUTO do nothing for the noop model")
        return settings
    if settings.max_batch_auto:
        from model.memory import free_device_bytes

        free = free_device_bytes(pipeline.device)
        if free is None:
            log.info("STAR_MAX_BATCH_AUTO sizes batches on CUDA only; %s keeps STAR_MAX_BATCH=%d",
                     pipeline.device, settings.max_batch)
        else:
            n = auto_max_batch(pipeline, free, settings.memory_margin)
            log.info("max batch %d from %.1f GiB free GPU memory (margin %.0f%%)", n, free / 2**30,
                     100 * settings.memory_margin)
            settings = settings.model_copy(update={"max_batch": n})
            pipeline.reserve(n)
    if settings.compile:
        from model.compile import compile_pipeline, default_buckets, warm_up

        buckets = default_buckets(settings.max_batch)
        compile_pipeline(pipeline, buckets)
        seconds = warm_up(pipeline, buckets)
        log.info("compiled the per-scale step for batches %s in %.0fs", list(buckets), sum(seconds.values()))
    return settings
