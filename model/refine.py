"""Causal-driven stable sampling: the scales from `from_scale` on are filled in steps with the sampler head.

A refined scale of l = pn*pn positions is filled in T steps (SamplerHeadConfig.steps_at) that
commit k_0, ..., k_{T-1} positions (config.refine_step_sizes: an arccos schedule summing to l).
Every step draws a token and its confidence (its probability under the filtered distribution) for
every position, from the base head's logits (base-head steps, guidance ramped as in plain sampling)
or from the sampler head's (guidance at the full cfg); only the positions committed in that step
take its draws, and a committed position never changes. Which positions a step commits:
    base-head step   the k most confident positions of the whole scale (the already committed
                     ones among them keep their tokens), then
    every step       the min(k, remaining) uncommitted positions of largest random priority (the
                     first `random_steps` steps) or of largest confidence (later steps).
Commits are top-k over masked scores, batched over images; the step sizes are known on the host,
so the loop reads no tensor values. Random priorities come from each image's own generator.

`Refinement` applies this to the images of a batch that asked for the head; the others of the same
batch are sampled plainly (one draw per scale), so each image depends only on its own request.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import refine_step_sizes
from .sampler import ImageRandom, RowParams, filter_rows, guide, sample_rows
from .sampler_head import SamplerHead

OnHeadLogits = Callable[[int, int, torch.Tensor], None]          # (si, step, logits_BlV before guidance)
OnCommits = Callable[[int, Sequence[int], torch.Tensor, torch.Tensor], None]  # (si, images, step_Nl, kind_Nl)


def _top_Nl(score_Nl: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [N, l]: the k largest scores of each row."""
    top = score_Nl.topk(k, dim=1).indices
    return torch.zeros_like(score_Nl, dtype=torch.bool).scatter_(1, top, True)


def refine_scale(head: SamplerHead, si: int, base_NlV: torch.Tensor, h_BlC: torch.Tensor, text_B1C: torch.Tensor,
                 params: RowParams, rand: ImageRandom, codebook_VCv: torch.Tensor, rope_lc: torch.Tensor,
                 on_head_logits: OnHeadLogits | None = None, guided: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [N, l] of refined scale si for N images, with the step that committed each position
    and how (0 = by confidence, 1 = by random priority), both [N, l] int64.

    base_NlV: the base head's guided logits (ramped t); h_BlC: the base model's hidden states of the
    scale (2N rows); text_B1C: head.text_rows of the 2N rows; rope_lc: RoPE of [(0, 0); the scale].
    guided: with fast guidance, the images whose unconditional rows h_BlC and text_B1C hold after
    the N conditional ones (in that order); the head guides those only (RowParams.uncond_images)."""
    rules = head.rules
    N, l, _ = base_NlV.shape
    dev = base_NlV.device
    uncond_at = None if guided is None else torch.as_tensor(list(guided), dtype=torch.int64, device=dev)
    base = filter_rows(base_NlV, params, inplace=False)      # filtered once, drawn from at every base step
    idx_Nl = torch.zeros(N, l, dtype=torch.int64, device=dev)
    step_Nl = torch.full((N, l), -1, dtype=torch.int64, device=dev)
    kind_Nl = torch.zeros(N, l, dtype=torch.int64, device=dev)
    done_Nl = torch.zeros(N, l, dtype=torch.bool, device=dev)
    e_NlCv = torch.zeros(N, l, codebook_VCv.shape[1], dtype=codebook_VCv.dtype, device=dev)
    for step, k in enumerate(refine_step_sizes(l, rules.steps_at(si))):
        if rules.uses_base_head(si, step):
            draw_Nl, conf_Nl = base.draw(rand, confidence=True)
            new_Nl = _top_Nl(conf_Nl, k) & ~done_Nl           # most confident of the whole scale
        else:
            logits_BlV = head.logits(e_NlCv, si, text_B1C, h_BlC, rope_lc, uncond_at)
            if on_head_logits is not None:
                on_head_logits(si, step, logits_BlV)
            guided_NlV = guide(logits_BlV, params.guidance_full(), guided)
            draw_Nl, conf_Nl = filter_rows(guided_NlV, params).draw(rand, confidence=True)
            new_Nl = torch.zeros_like(done_Nl)
        taken_Nl = done_Nl | new_Nl
        random = rules.commits_random(step)
        score_Nl = rand.priorities(si, step, l, dev) if random else conf_Nl
        extra_Nl = _top_Nl(score_Nl.masked_fill(taken_Nl, -torch.inf), k) & ~taken_Nl
        new_Nl |= extra_Nl
        idx_Nl = torch.where(new_Nl, draw_Nl, idx_Nl)
        e_NlCv = torch.where(new_Nl[..., None], codebook_VCv[draw_Nl], e_NlCv)
        step_Nl.masked_fill_(new_Nl, step)
        kind_Nl.masked_fill_(extra_Nl, int(random))
        done_Nl = taken_Nl | extra_Nl
    return idx_Nl, step_Nl, kind_Nl


class Refinement:
    """The refined scales of one batch: the images `head_images` use the head, the others plain
    sampling. Per-request pieces (their parameters, generators, the head's text rows) are built once."""

    def __init__(self, head: SamplerHead, head_images: Sequence[int], num_images: int, pooled_cond_ND: torch.Tensor,
                 pooled_uncond_ND: torch.Tensor, params: RowParams, rand: ImageRandom, codebook_VCv: torch.Tensor):
        self.head, self.codebook_VCv = head, codebook_VCv
        self.from_scale = head.rules.from_scale
        self.images = sorted(set(int(i) for i in head_images))
        if any(not 0 <= i < num_images for i in self.images):
            raise IndexError(f"head images {self.images} outside a batch of {num_images}")
        others = [i for i in range(num_images) if i not in set(self.images)]
        dev = pooled_cond_ND.device
        self.all = not others
        self.at = torch.tensor(self.images, dtype=torch.int64, device=dev)
        self.rows = torch.cat((self.at, self.at + num_images))
        self.others = torch.tensor(others, dtype=torch.int64, device=dev)
        self.params, self.rand = (params, rand) if self.all else (params.select(self.images), rand.select(self.images))
        self.params_others, self.rand_others = params.select(others), rand.select(others)
        pooled_BD = torch.cat((pooled_cond_ND[self.at], pooled_uncond_ND[self.at]))
        self.text_B1C = head.text_rows(pooled_BD)

    def sample(self, si: int, logits_NlV: torch.Tensor, h_BlC: torch.Tensor, rope_lc: torch.Tensor,
               on_head_logits: OnHeadLogits | None = None, on_commits: OnCommits | None = None,
               uncond_images: Sequence[int] | None = None) -> torch.Tensor:
        """Tokens [N, l] of refined scale si: the head's images refined, the others drawn once.
        uncond_images: the images whose unconditional rows h_BlC holds (RowParams.uncond_images)."""
        base_NlV = logits_NlV if self.all else logits_NlV[self.at]
        text_B1C, guided = self.text_B1C, None
        if uncond_images is None:
            h_BlC = h_BlC if self.all else h_BlC[self.rows]
        else:   # fast guidance: only the head images still guided keep an unconditional row
            N, local = logits_NlV.shape[0], {n: j for j, n in enumerate(self.images)}
            kept = [(N + r, local[n]) for r, n in enumerate(uncond_images) if n in local]
            guided = [j for _, j in kept]
            rows = self.images + [r for r, _ in kept]
            h_BlC = h_BlC[torch.as_tensor(rows, dtype=torch.int64, device=h_BlC.device)]
            text_at = list(range(len(self.images))) + [len(self.images) + j for j in guided]
            text_B1C = text_B1C[torch.as_tensor(text_at, dtype=torch.int64, device=text_B1C.device)]
        idx_Nl, step_Nl, kind_Nl = refine_scale(self.head, si, base_NlV, h_BlC, text_B1C, self.params,
                                                 self.rand, self.codebook_VCv, rope_lc, on_head_logits, guided)
        if on_commits is not None:
            on_commits(si, self.images, step_Nl, kind_Nl)
        if self.all:
            return idx_Nl
        out_Nl = torch.empty(logits_NlV.shape[:2], dtype=torch.int64, device=logits_NlV.device)
        out_Nl[self.at] = idx_Nl
        if len(self.others):
            out_Nl[self.others] = sample_rows(logits_NlV[self.others], self.params_others, self.rand_others)
        return out_Nl
