"""Normalized 2D rotary position embedding (STAR's RoPE on self-attention Q and K).

Every scale's pn x pn token map is placed on the same [0, norm] x [0, norm] square (a 1x1 map sits
at 0), so a token's angle depends on where it is in the image, not on the map's resolution.
A head of c dims is c/2 complex pairs (dims 2j, 2j+1): pairs 0..c/4-1 rotate with the column,
pairs c/4..c/2-1 with the row, at frequencies theta^(-4k/c), k = 0..c/4-1.
"""
from __future__ import annotations

import torch


def axis_positions(pn: int, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row coordinate of each token of a pn x pn map in raster order, scaled to [0, norm]."""
    t = torch.arange(pn * pn, dtype=torch.float32)
    col = t % pn
    row = torch.div(t, pn, rounding_mode="floor")
    if pn > 1:
        col = col / col.max() * norm
        row = row / row.max() * norm
    return col, row


def rope_tables(patch_nums: tuple[int, ...], head_dim: int, theta: float, norm: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every token's angles, both [L, head_dim // 2] float32 (all scales concatenated)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    angles = []
    for pn in patch_nums:
        col, row = axis_positions(pn, norm)
        angles.append(torch.cat([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1))
    angles_Lc = torch.cat(angles, dim=0)
    return torch.cos(angles_Lc), torch.sin(angles_Lc)


def apply_rope(x_BHlc: torch.Tensor, cos_lc: torch.Tensor, sin_lc: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim; computed in (at least) float32, returned in x's dtype."""
    compute = torch.promote_types(x_BHlc.dtype, torch.float32)
    x = x_BHlc.to(compute).unflatten(-1, (-1, 2))
    cos_lc, sin_lc = cos_lc.to(compute), sin_lc.to(compute)
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos_lc - x1 * sin_lc, x0 * sin_lc + x1 * cos_lc), dim=-1)
    return out.flatten(-2).to(x_BHlc.dtype)
