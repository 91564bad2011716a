"""Static self-attention KV cache: preallocated once, written scale by scale by index.

K and V of every layer live in two tensors [depth, rows, H, L, c]. Scale si writes positions
[begin, end) of the first B rows and attends over [0, end); nothing is concatenated, so no memory
is allocated inside the scale loop and the shapes of one scale are the same on every call.
Every position is written before it is read in a call, so the cache is never cleared.
"""
from __future__ import annotations

import torch

from .config import StarConfig


class KVCache:
    def __init__(self, depth: int, max_rows: int, num_heads: int, L: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (depth, max_rows, num_heads, L, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_config(cls, cfg: StarConfig, max_rows: int, dtype: torch.dtype, device) -> "KVCache":
        return cls(cfg.depth, max_rows, cfg.num_heads, cfg.L, cfg.head_dim, dtype, device)

    @property
    def max_rows(self) -> int:
        return self.k.shape[1]

    def fits(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        return rows <= self.max_rows and self.k.dtype == dtype and self.k.device == torch.device(device)

    def write_kv_(self, layer: int, begin: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this scale's K/V at [begin, begin + l) and return the views over [0, begin + l)."""
        B, end = k_BHlc.shape[0], begin + k_BHlc.shape[2]
        self.k[layer, :B, :, begin:end] = k_BHlc
        self.v[layer, :B, :, begin:end] = v_BHlc
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]

    def slots(self, layer: int, begin: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions [begin, begin + length) of the first rows rows, to be written in place
        (the attention writes rotated K straight into its slot: no temporary, no copy)."""
        end = begin + length
        return self.k[layer, :rows, :, begin:end], self.v[layer, :rows, :, begin:end]

    def prefix(self, layer: int, rows: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions [0, end) of the first rows rows (what a scale attends to)."""
        return self.k[layer, :rows, :, :end], self.v[layer, :rows, :, :end]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
