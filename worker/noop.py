"""A stand-in pipeline with StarPipeline's interface that returns flat grey images at once.

`STAR_MODEL=noop[:SIZE[:SCALE_MS]]`, e.g. `noop`, `noop:1024` or `noop:512:20` (20 ms per scale).
It measures the service around the model (queue, batching, PNG, storage) and lets tests hold a
batch open between scales. Imports no torch: its requests and results are model.request's. It has
no sampler head unless built with `sampler_head=True` (tests): requests may name any sampler the
model would take (`resolve_sampler`), and every image is the same grey whatever it names.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence

import numpy as np

from model.request import ImageRequest, ImageResult, resolve_sampler

SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's 256-px schedule; S = 10 scales


class NoopPipeline:
    device = "cpu"
    dtype = "uint8"

    def __init__(self, image_size: int = 256, scale_s: float = 0.0, patch_nums: tuple[int, ...] = SCALES,
                 sampler_head: bool = False):
        self.image_size = image_size
        self.scale_s = scale_s
        self.patch_nums = patch_nums
        self.name = f"noop-{image_size}"
        self.sampling: dict = {}   # no recommended sampling: the service's defaults apply
        self.has_sampler_head = sampler_head
        self.calls = 0

    @classmethod
    def from_spec(cls, spec: str) -> "NoopPipeline":
        parts = spec.split(":")
        if parts[0] != "noop" or len(parts) > 3:
            raise ValueError(f"not a noop spec: {spec!r} (expected noop[:SIZE[:SCALE_MS]])")
        size = int(parts[1]) if len(parts) > 1 and parts[1] else 256
        scale_ms = float(parts[2]) if len(parts) > 2 else 0.0
        return cls(size, scale_ms / 1000.0)

    def resolve_sampler(self, sampler: str | None) -> str:
        """As StarPipeline.resolve_sampler: "head" or "plain" (ValueError for "head" without a head)."""
        return resolve_sampler(sampler, self.has_sampler_head, self.name)

    def generate(self, requests: Sequence[ImageRequest], *,
                 on_scale: Callable[[int, int], Collection[int] | None] | None = None) -> list[ImageResult]:
        self.calls += 1
        for request in requests:
            self.resolve_sampler(request.sampler)   # refused as StarPipeline refuses it
        canceled: set[int] = set()
        scales = len(self.patch_nums)
        for k in range(1, scales + 1):
            if self.scale_s:
                time.sleep(self.scale_s)
            if on_scale is not None:
                canceled.update(on_scale(k, scales) or ())
        grey = np.full((self.image_size, self.image_size, 3), 128, dtype=np.uint8)
        return [ImageResult(None, False, True) if i in canceled else ImageResult(grey.copy(), False)
                for i in range(len(requests))]
