"""Static self-attention KV cache: preallocated once, written scale by scale by index.

No later scale reads the last scale's keys and values, so they are not kept across layers: the
cache stores every layer's prefix (the P = L - l_last tokens of all scales but the last) and one
spare stretch of l_last tokens. K (and V) of all layers share one tensor [rows, H, T, c] with
T = depth * P + l_last, the layers' prefixes in reverse order:

    position p of layer i  ->  index (depth - 1 - i) * P + p

    | layer D-1 prefix | ... | layer 1 prefix | layer 0 prefix | spare (l_last) |

Positions [0, P) of a layer are its own. Positions [P, L) of layer i (the last scale) run into
the prefix of layer i - 1 (the spare for layer 0), which nothing reads any more once layer i runs
the last scale: the last scale's K/V live there only while their layer runs, and its attention
reads prefix + own K/V as one contiguous view, in the same order as a full cache would hold them
(no copy, no concatenation). The one rule this imposes: within a request, the last scale runs
once, after every other scale (the scale loop and a block-causal full pass both do).

Scale si writes positions [begin, end) of the first B rows and attends over [0, end); nothing is
concatenated, so no memory is allocated inside the scale loop and the shapes of one scale are the
same on every call. Every position is written before it is read in a call, so the cache is never
cleared. `prefix_len=None` (or L) gives a full cache of all L tokens per layer (no sharing).
"""
from __future__ import annotations

import torch

from .config import StarConfig


def cache_tokens(depth: int, L: int, prefix_len: int) -> int:
    """Tokens per row and head that a cache of this shape stores (T above)."""
    if not 0 < prefix_len <= L:
        raise ValueError(f"prefix_len must be in (0, {L}], got {prefix_len}")
    return depth * prefix_len + (L - prefix_len)


class KVCache:
    def __init__(self, depth: int, max_rows: int, num_heads: int, L: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, prefix_len: int | None = None):
        self.depth, self.L = depth, L
        self.prefix_len = L if prefix_len is None else prefix_len
        shape = (max_rows, num_heads, cache_tokens(depth, L, self.prefix_len), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_config(cls, cfg: StarConfig, max_rows: int, dtype: torch.dtype, device) -> "KVCache":
        """The lean cache of this architecture: every layer's prefix, the last scale shared."""
        return cls(cfg.depth, max_rows, cfg.num_heads, cfg.L, cfg.head_dim, dtype, device,
                   prefix_len=cfg.L - cfg.patch_nums[-1] ** 2)

    @property
    def max_rows(self) -> int:
        return self.k.shape[0]

    def fits(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        return rows <= self.max_rows and self.k.dtype == dtype and self.k.device == torch.device(device)

    def _span(self, layer: int, begin: int, end: int) -> slice:
        if not (0 <= layer < self.depth and 0 <= begin <= end <= self.L):
            raise IndexError(f"layer {layer}, positions [{begin}, {end}) outside the cache "
                             f"({self.depth} layers, {self.L} positions)")
        base = (self.depth - 1 - layer) * self.prefix_len
        return slice(base + begin, base + end)

    def write_kv_(self, layer: int, begin: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this scale's K/V at [begin, begin + l) and return the views over [0, begin + l)."""
        k_slot, v_slot = self.slots(layer, begin, k_BHlc.shape[0], k_BHlc.shape[2])
        k_slot.copy_(k_BHlc)
        v_slot.copy_(v_BHlc)
        return self.prefix(layer, k_BHlc.shape[0], begin + k_BHlc.shape[2])

    def slots(self, layer: int, begin: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions [begin, begin + length) of the first rows rows, to be written in place
        (the attention writes rotated K straight into its slot: no temporary, no copy)."""
        span = self._span(layer, begin, begin + length)
        return self.k[:rows, :, span], self.v[:rows, :, span]

    def prefix(self, layer: int, rows: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions [0, end) of the first rows rows (what a scale attends to)."""
        span = self._span(layer, 0, end)
        return self.k[:rows, :, span], self.v[:rows, :, span]

    def nbytes(self) -> int:
        """Bytes the cache's tensors hold (their storages: what was allocated)."""
        return self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()
