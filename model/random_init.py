"""Deterministic random weights for the presets (`tiny`, `small`, ...): no files, no global RNG.

Transformers, VQ-VAEs and sampler heads are built on the meta device, materialised with `to_empty`
and filled from one seeded generator, so the same seed always gives the same model and nothing
else's randomness moves.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import StarConfig
from .sampler_head import SamplerHead
from .transformer import StarTransformer
from .vqvae import VQVAE


def _fill_(module: nn.Module, g: torch.Generator, std: float, codebook_std: float) -> None:
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            if name == "class_emb.weight":  # never read by STAR
                p.zero_()
            elif leaf == "scale_mul_1H11":
                p.fill_(math.log(4.0))
            elif "norm" in name and leaf == "weight":
                p.fill_(1.0)
            elif leaf in ("bias", "q_bias", "v_bias"):
                p.zero_()
            elif name == "quantize.embedding.weight":
                p.normal_(0.0, codebook_std, generator=g).clamp_(-3 * codebook_std, 3 * codebook_std)
            elif p.dim() == 4:  # conv: variance-preserving
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:  # normal clipped at 2 std (trunc_normal_ is ~50x slower on CPU)
                p.normal_(0.0, std, generator=g).clamp_(-2 * std, 2 * std)
    for name, b in module.named_buffers():
        b.zero_()


def _materialise(module: nn.Module, seed: int, std: float, codebook_std: float = 1.0) -> nn.Module:
    module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    _fill_(module, g, std, codebook_std)
    return module.eval().requires_grad_(False)


def random_transformer(cfg: StarConfig, seed: int = 0, std: float = 0.02) -> StarTransformer:
    with torch.device("meta"):
        model = StarTransformer(cfg)
    _materialise(model, seed, std)
    model.reset_buffers_("cpu")
    return model


def random_sampler_head(cfg: StarConfig, seed: int = 3, std: float = 0.02) -> SamplerHead:
    with torch.device("meta"):
        head = SamplerHead(cfg)
    return _materialise(head, seed, std)


def random_vae(cfg: StarConfig, seed: int = 1) -> VQVAE:
    with torch.device("meta"):
        vae = VQVAE(cfg)
    return _materialise(vae, seed, std=0.02)
