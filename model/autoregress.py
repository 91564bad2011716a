"""The scale loop: next-scale prediction with a static KV cache, guidance and per-image sampling."""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .sampler import RowParams, guide, sample_rows
from .transformer import StarTransformer
from .vqvae import VQVAE

OnScale = Callable[[int, int], Collection[int] | None]
OnLogits = Callable[[int, torch.Tensor], None]


@dataclass
class Conditioning:
    """Encoded text of N images: the conditional prompt's hidden states, mask and pooled vector,
    and the pooled vector of the unconditional branch (empty or negative prompt)."""

    hidden_NTD: torch.Tensor
    mask_NT: torch.Tensor
    pooled_cond_ND: torch.Tensor
    pooled_uncond_ND: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.pooled_cond_ND.shape[0]


@dataclass
class ScaleOutput:
    idx_per_scale: list[torch.Tensor]   # [N, pn*pn] int64 per scale that ran
    f_hat_NChw: torch.Tensor            # accumulated VQ features after the last scale that ran
    canceled: list[bool]                # per image, set by on_scale


@torch.inference_mode()
def sample_scales(model: StarTransformer, vae: VQVAE, cond: Conditioning, params: RowParams,
                  gens: list[torch.Generator], cache: KVCache, *, on_scale: OnScale | None = None,
                  on_logits: OnLogits | None = None) -> ScaleOutput:
    """Run all scales for N images (2N rows: conditional then unconditional).

    on_logits(si, logits_BlV) sees the head's float32 logits before guidance (for checks).
    on_scale(k, S) is called after scale k (1-based) is sampled and may return image indices to
    cancel; canceled images keep their rows (so nothing else changes) and the loop stops early
    once every image is canceled. Nothing in the loop reads tensor values on the host.
    """
    cfg = model.cfg
    N, S, H = cond.num_images, cfg.num_scales, cfg.patch_nums[-1]
    if len(gens) != N or params.cfg_N.shape[0] != N:
        raise ValueError(f"{N} images but {len(gens)} generators and {params.cfg_N.shape[0]} parameter rows")
    if 2 * N > cache.max_rows:
        raise ValueError(f"KV cache holds {cache.max_rows} rows, {2 * N} needed")
    text = model.text_kv(cond.hidden_NTD, cond.mask_NT)
    x_BlC = model.start_tokens(torch.cat((cond.pooled_cond_ND, cond.pooled_uncond_ND)))
    f_hat_NChw = torch.zeros(N, cfg.vae_channels, H, H, dtype=vae.quantize.embedding.weight.dtype,
                             device=x_BlC.device)
    idx_per_scale: list[torch.Tensor] = []
    canceled = [False] * N
    for si in range(S):
        logits_BlV = model.scale_logits(x_BlC, si, cache, text)
        if on_logits is not None:
            on_logits(si, logits_BlV)
        logits_NlV = guide(logits_BlV, params.guidance_t(si, S))
        idx_Nl = sample_rows(logits_NlV, params, gens)
        idx_per_scale.append(idx_Nl)
        f_next_NlCv = vae.add_scale_(f_hat_NChw, idx_Nl, si)
        if f_next_NlCv is not None:
            x_NlC = model.scale_tokens(f_next_NlCv, si + 1)
            x_BlC = torch.cat((x_NlC, x_NlC))
        if on_scale is not None:
            for i in on_scale(si + 1, S) or ():
                if not 0 <= int(i) < N:
                    raise IndexError(f"on_scale returned index {i}, batch has {N} images")
                canceled[int(i)] = True
            if all(canceled):
                break
    return ScaleOutput(idx_per_scale, f_hat_NChw, canceled)
