"""Optional torch.compile of the per-scale step (blocks + head), applied from outside the model.

`compile_pipeline(pipe, buckets)` replaces `pipe.transformer.scale_logits` on that one instance
with a compiled version. Shapes are static (`dynamic=False`): one graph per (scale, bucket). A
batch of N images runs in the smallest bucket >= N: the conditional rows, the unconditional rows
and the text K/V are padded with copies of their first row (rows never mix, so the padding cannot
change a real row) and the padded rows' logits are dropped. The KV cache is reserved for the
largest bucket. A batch larger than every bucket runs at its own size (one more compilation).

`warm_up(pipe, buckets)` runs the token stage once per bucket so every graph is compiled before the
first request (the worker does this at start when STAR_COMPILE is set).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from .transformer import TextKV

log = logging.getLogger(__name__)


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, and max_batch itself: (1, 2, 4, 8, 12) for 12."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return tuple(out) + (max_batch,)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    return min((b for b in buckets if b >= n), default=n)


def _pad_first(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [n, ...] -> [rows, ...], the extra rows copies of row 0."""
    n = t.shape[0]
    return t if rows == n else torch.cat((t, t[:1].expand(rows - n, *t.shape[1:])))


def pad_rows(x_BlC: torch.Tensor, images: int, bucket: int) -> torch.Tensor:
    """[cond N; uncond N] -> [cond N, pad; uncond N, pad] with 2 * bucket rows."""
    return torch.cat((_pad_first(x_BlC[:images], bucket), _pad_first(x_BlC[images:], bucket)))


def unpad_rows(y_BlV: torch.Tensor, images: int, bucket: int) -> torch.Tensor:
    return torch.cat((y_BlV[:images], y_BlV[bucket:bucket + images]))


def pad_text(text: TextKV, bucket: int) -> TextKV:
    kv = [(_pad_first(k, bucket), _pad_first(v, bucket)) for k, v in text.kv]
    return TextKV(kv, _pad_first(text.mask_N11T, bucket), text.consts)


class CompiledStep:
    """Callable with scale_logits' signature: pads to a bucket, runs the compiled step, unpads."""

    def __init__(self, eager_step, buckets: Sequence[int], *, mode: str | None = None,
                 backend: str = "inductor", fullgraph: bool = False, dynamic: bool = False):
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.eager = eager_step
        self.compiled = torch.compile(eager_step, dynamic=dynamic, mode=mode, backend=backend, fullgraph=fullgraph)
        self._text_src: TextKV | None = None
        self._text_pad: TextKV | None = None

    def __call__(self, x_BlC: torch.Tensor, si: int, cache, text: TextKV) -> torch.Tensor:
        if text.uncond_at is not None:
            # fast guidance dropped some unconditional rows: a row layout the graphs were not
            # compiled for (one graph per row count would multiply them); this scale runs eagerly
            return self.eager(x_BlC, si, cache, text)
        N = text.kv[0][0].shape[0]
        Nb = bucket_for(N, self.buckets)
        if Nb != N and 2 * Nb > cache.max_rows:
            Nb = N          # the cache cannot hold the padded rows: run at the batch's own size
        if Nb == N:
            return self.compiled(x_BlC, si, cache, text)
        if self._text_src is not text:        # once per request, not per scale
            self._text_src, self._text_pad = text, pad_text(text, Nb)
        logits = self.compiled(pad_rows(x_BlC, N, Nb), si, cache, self._text_pad)
        return unpad_rows(logits, N, Nb)


def compile_pipeline(pipe, buckets: Sequence[int] = (1, 2, 4, 8), *, mode: str | None = None,
                     backend: str = "inductor", fullgraph: bool = False, dynamic: bool = False) -> CompiledStep:
    """Compile pipe's per-scale step for these batch-size buckets (no warm-up; see warm_up).

    dynamic=True compiles shape-generic graphs (one per scale whatever the bucket: less compile
    time, somewhat slower kernels, no CUDA graphs)."""
    import torch._dynamo

    tr = pipe.transformer
    uncompile_pipeline(pipe)
    graphs = tr.cfg.num_scales * len(set(buckets)) + 8
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, graphs)
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * graphs)
    step = CompiledStep(tr.scale_logits, buckets, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    tr.scale_logits = step            # instance attribute: shadows the method for this model only
    cache = pipe.reserve(max(step.buckets))
    # the cache is written in place on every scale: a static address lets CUDA graphs
    # (mode="reduce-overhead") replay those writes instead of copying the cache in and out
    torch._dynamo.mark_static_address(cache.k)
    torch._dynamo.mark_static_address(cache.v)
    return step


def uncompile_pipeline(pipe) -> None:
    pipe.transformer.__dict__.pop("scale_logits", None)


def warm_up(pipe, buckets: Sequence[int]) -> dict[int, float]:
    """Run the token stage once at every bucket size (compiles every graph); seconds per bucket."""
    from .pipeline import ImageRequest

    seconds = {}
    for b in sorted(set(buckets)):
        # plain: batches with sampler-head images run eagerly (autoregress.sample_scales)
        requests = [ImageRequest(prompt="warm-up", seed=i, sampler="plain") for i in range(b)]
        t0 = time.perf_counter()
        cond, _ = pipe.encode_prompts([r.prompt for r in requests], [r.negative_prompt for r in requests])
        pipe.sample_tokens(cond, requests)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        seconds[b] = time.perf_counter() - t0
        log.info("compiled warm-up at batch %d took %.1fs", b, seconds[b])
    return seconds
