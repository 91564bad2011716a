"""The scale loop: next-scale prediction with a static KV cache, guidance and per-image sampling.

Images that ask for the sampler head have their scales from `from_scale` on refined step by step
(model/refine.py); every other scale, and every scale of the other images, is drawn at once.

Fast guidance (RowParams.cfg_stop_host): from its stop scale on, an image runs its conditional
row only; the scale's rows are [conditional rows of all N images; unconditional rows of the images
still guided] (RowParams.uncond_images), so the images that stopped cost half the rows.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .kv_cache import KVCache
from .refine import OnCommits, OnHeadLogits, Refinement
from .sampler import ImageRandom, RowParams, as_random, guide, sample_rows
from .sampler_head import SamplerHead
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
                  gens: ImageRandom | Sequence[torch.Generator], cache: KVCache, *,
                  on_scale: OnScale | None = None, on_logits: OnLogits | None = None,
                  head: SamplerHead | None = None, head_images: Sequence[int] = (),
                  on_head_logits: OnHeadLogits | None = None, on_commits: OnCommits | None = None) -> ScaleOutput:
    """Run all scales for N images (2N rows: conditional then unconditional; fewer unconditional
    rows on the scales where some images stopped guidance, params.cfg_stop_host).

    on_logits(si, logits_BlV) sees the base model's float32 logits before guidance (for checks).
    on_scale(k, S) is called after scale k (1-based) is sampled and may return image indices to
    cancel; canceled images keep their rows (so nothing else changes) and the loop stops early
    once every image is canceled. Nothing in the loop reads tensor values on the host.
    head_images: the images refined with `head` (see model/refine.py); on_head_logits(si, step,
    logits_BlV) sees the sampler head's logits of those images' rows, on_commits(si, images,
    step_Nl, kind_Nl) when and how each of their positions was committed.
    """
    cfg = model.cfg
    N, S, H = cond.num_images, cfg.num_scales, cfg.patch_nums[-1]
    rand = as_random(gens)
    if len(rand) != N or params.cfg_N.shape[0] != N:
        raise ValueError(f"{N} images but {len(rand)} generators and {params.cfg_N.shape[0]} parameter rows")
    if 2 * N > cache.max_rows:
        raise ValueError(f"KV cache holds {cache.max_rows} rows, {2 * N} needed")
    if head_images and head is None:
        raise ValueError("head_images given but no sampler head")
    text = model.text_kv(cond.hidden_NTD, cond.mask_NT)
    uncond = params.uncond_images(0)
    x_BlC = model.start_tokens(torch.cat((cond.pooled_cond_ND, _rows(cond.pooled_uncond_ND, uncond))))
    codebook_VCv = vae.quantize.embedding.weight
    f_hat_NChw = torch.zeros(N, cfg.vae_channels, H, H, dtype=codebook_VCv.dtype, device=x_BlC.device)
    refinement = Refinement(head, head_images, N, cond.pooled_cond_ND, cond.pooled_uncond_ND, params, rand,
                            codebook_VCv) if head_images else None
    # A compiled step (model/compile.py) pads the rows to a bucket and returns logits only; the refined
    # scales need the hidden states, so a batch with head images runs every scale eagerly (one row
    # layout in the KV cache throughout).
    scale_logits = model.scale_logits if refinement is None else partial(StarTransformer.scale_logits, model)
    idx_per_scale: list[torch.Tensor] = []
    canceled = [False] * N
    for si in range(S):
        refined = refinement is not None and si >= refinement.from_scale
        text_si = text.with_rows(None if uncond is None else _index(uncond, x_BlC.device))
        if refined:   # the head also needs the hidden states before the logit LayerNorm
            h_BlC = model.blocks_forward(x_BlC, si, cache, text_si)
            logits_BlV = model.logits(h_BlC)
        else:
            logits_BlV = scale_logits(x_BlC, si, cache, text_si)
        if on_logits is not None:
            on_logits(si, logits_BlV)
        logits_NlV = guide(logits_BlV, params.guidance_t(si, S), uncond)
        if refined:
            begin, end = cfg.begin_ends[si]
            rope_lc = torch.cat((model.rope_freqs(0, 1), model.rope_freqs(begin, end)))
            idx_Nl = refinement.sample(si, logits_NlV, h_BlC, rope_lc, on_head_logits, on_commits, uncond)
        else:
            idx_Nl = sample_rows(logits_NlV, params, rand)
        idx_per_scale.append(idx_Nl)
        f_next_NlCv = vae.add_scale_(f_hat_NChw, idx_Nl, si)
        if f_next_NlCv is not None:
            x_NlC = model.scale_tokens(f_next_NlCv, si + 1)
            uncond = params.uncond_images(si + 1)
            x_BlC = torch.cat((x_NlC, _rows(x_NlC, uncond)))
        if on_scale is not None:
            for i in on_scale(si + 1, S) or ():
                if not 0 <= int(i) < N:
                    raise IndexError(f"on_scale returned index {i}, batch has {N} images")
                canceled[int(i)] = True
            if all(canceled):
                break
    return ScaleOutput(idx_per_scale, f_hat_NChw, canceled)


def _rows(t_N: torch.Tensor, images: Sequence[int] | None) -> torch.Tensor:
    """The rows of `images` (all of t_N when None)."""
    return t_N if images is None else t_N[_index(images, t_N.device)]


def _index(images: Sequence[int], device) -> torch.Tensor:
    return torch.as_tensor(list(images), dtype=torch.int64, device=device)
