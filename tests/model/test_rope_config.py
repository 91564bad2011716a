"""Normalized 2D RoPE, the architecture presets and the phi-conv choice of the VQ-VAE."""
from __future__ import annotations

import pytest
import torch

from model.config import PRESETS, StarConfig, get_preset
from model.rope import apply_rope, axis_positions, rope_tables
from model.vqvae import phi_index


def test_every_scale_spans_the_same_square():
    col, row = axis_positions(1, 64.0)
    assert col.tolist() == [0.0] and row.tolist() == [0.0]
    col, row = axis_positions(3, 64.0)                         # raster order: row-major
    assert col.tolist() == [0, 32, 64] * 3 and row.tolist() == [0] * 3 + [32] * 3 + [64] * 3
    col, _ = axis_positions(16, 64.0)
    assert (col.min(), col.max()) == (0.0, 64.0)


def test_first_half_rotates_with_the_column_second_half_with_the_row():
    cos, sin = rope_tables((1, 2), head_dim=64, theta=10000.0, norm=64.0)
    assert cos.shape == (5, 32)
    assert torch.equal(cos[0], torch.ones(32)) and torch.equal(sin[0], torch.zeros(32))   # pn = 1 at 0
    # tokens of the 2x2 map: (row 0, col 0), (0, 1), (1, 0), (1, 1)
    freqs = 10000.0 ** (-torch.arange(16) * 4 / 64)
    torch.testing.assert_close(sin[2, :16], torch.sin(64 * freqs))   # col 1 -> position 64
    torch.testing.assert_close(sin[2, 16:], torch.zeros(16))         # row 0
    torch.testing.assert_close(sin[3, 16:], torch.sin(64 * freqs))   # row 1


def test_rope_preserves_norms_and_depends_on_relative_position():
    cos, sin = rope_tables((1, 2, 4), head_dim=64, theta=10000.0, norm=64.0)
    q, k = torch.randn(1, 1, 1, 64).expand(1, 1, 21, 64), torch.randn(1, 1, 1, 64).expand(1, 1, 21, 64)
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    # 2x2 map: (0,1)-(0,0) and (1,1)-(1,0) are the same offset in the square, so the same score
    score = (q_rot[0, 0] @ k_rot[0, 0].T)
    assert torch.allclose(score[2, 1], score[4, 3], atol=1e-5)       # offset (0, 64) twice
    assert not torch.allclose(score[2, 1], score[3, 1], atol=1e-3)   # other offset


def test_presets_and_derived_values():
    s1024 = get_preset("star-1024")
    assert (s1024.depth, s1024.embed_dim, s1024.num_heads, s1024.image_size, s1024.L) == (30, 1920, 30, 1024, 9451)
    assert s1024.begin_ends[-1] == (9451 - 4096, 9451)
    assert get_preset("star-512").image_size == 512 and get_preset("star-256-d16").embed_dim == 1024
    small = get_preset("small")
    assert (small.depth, small.vocab_size, small.vae_channels, small.vae_ch) == (8, 4096, 32, 160)
    assert small.image_size == 256 and small.text_dim == 1024
    tiny = PRESETS["tiny"]
    assert StarConfig.from_dict(tiny.to_dict()) == tiny
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("star-2048")
    with pytest.raises(ValueError):
        StarConfig(name="bad", depth=2, patch_nums=(2, 4))
    with pytest.raises(ValueError, match="unknown architecture fields"):
        StarConfig.from_dict({**tiny.to_dict(), "wings": 2})


def test_phi_choice_follows_numpy_linspace_argmin():
    # official PhiPartiallyShared with 4 convs: si = 2 and 7 of 10 sit (almost) halfway between two
    # ticks, float rounding of linspace decides; the golden f_hat pins these choices
    assert [phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(si, 14) for si in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
