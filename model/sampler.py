"""Per-row sampling: classifier-free guidance, top-k / top-p filtering, temperature, one RNG per image.

Filtering follows VAR's `sample_with_top_k_top_p_`: top-k keeps every logit >= the k-th largest
(ties kept); top-p sorts ascending, removes the tokens whose cumulative probability is <= 1 - p
(the most likely token always stays). k = 0 / p = 0 switch a filter off. The temperature divides
the filtered logits, then one token is drawn per position with the Gumbel-max trick using noise from
that image's own generator, so an image never depends on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowParams:
    """Sampling parameters of N images as tensors (one entry per image)."""

    cfg_N: torch.Tensor          # float64 guidance scale
    top_k_N: torch.Tensor        # int64, 0 = off
    top_p_N: torch.Tensor        # float64, 0 = off
    temperature_N: torch.Tensor  # float64, > 0
    top_k_max: int | None = None  # largest top_k on the host (0 if any row has top-k off); None: unknown

    @classmethod
    def build(cls, cfg, top_k, top_p, temperature, device) -> "RowParams":
        f64 = dict(dtype=torch.float64, device=device)
        host_k = torch.as_tensor(top_k, dtype=torch.int64).flatten().tolist()
        params = cls(torch.as_tensor(cfg, **f64), torch.as_tensor(top_k, dtype=torch.int64, device=device),
                     torch.as_tensor(top_p, **f64), torch.as_tensor(temperature, **f64),
                     0 if not host_k or min(host_k) <= 0 else max(host_k))
        params.validate()
        return params

    def validate(self) -> None:
        """Raise ValueError on parameters no sampler could use (checked once, before the loop)."""
        if bool((self.top_k_N < 0).any()):
            raise ValueError("top_k must be >= 0 (0 = off)")
        if bool(((self.top_p_N < 0) | (self.top_p_N > 1)).any()):
            raise ValueError("top_p must be in [0, 1] (0 = off)")
        if bool((self.temperature_N <= 0).any()):
            raise ValueError("temperature must be > 0")
        if not bool(torch.isfinite(self.cfg_N).all()):
            raise ValueError("cfg must be finite")

    def guidance_t(self, si: int, num_scales: int) -> torch.Tensor:
        """t per image at scale si: cfg * si / (S - 1), [N, 1, 1] float64."""
        ratio = si / (num_scales - 1) if num_scales > 1 else 0.0
        return (self.cfg_N * ratio)[:, None, None]


def make_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def guide(logits_BlV: torch.Tensor, t_N11: torch.Tensor) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, rows laid out [cond N; uncond N]."""
    N = logits_BlV.shape[0] // 2
    one_plus_t = (1 + t_N11).to(logits_BlV.dtype)
    return one_plus_t * logits_BlV[:N] - t_N11.to(logits_BlV.dtype) * logits_BlV[N:]


def filter_top_k_top_p_(logits_NlV: torch.Tensor, top_k_N: torch.Tensor, top_p_N: torch.Tensor) -> torch.Tensor:
    """Set filtered-out logits to -inf in place (per-row k and p) and return the tensor."""
    N, l, V = logits_NlV.shape
    sorted_asc, order = logits_NlV.sort(dim=-1)
    k = top_k_N.clamp(max=V)
    kth_pos = (V - k).clamp(max=V - 1).view(N, 1, 1).expand(N, l, 1)
    neg_inf = torch.tensor(-torch.inf, dtype=logits_NlV.dtype, device=logits_NlV.device)
    thresh = torch.where((k > 0).view(N, 1, 1), sorted_asc.gather(-1, kth_pos), neg_inf)
    sorted_asc = sorted_asc.masked_fill(sorted_asc < thresh, -torch.inf)
    logits_NlV.masked_fill_(logits_NlV < thresh, -torch.inf)
    cum = sorted_asc.softmax(dim=-1).cumsum_(dim=-1)
    remove_sorted = cum <= (1 - top_p_N).to(cum.dtype).view(N, 1, 1)
    remove_sorted[..., -1:] = False
    remove_sorted &= (top_p_N > 0).view(N, 1, 1)
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return logits_NlV.masked_fill_(remove, -torch.inf)


def gumbel_noise(shape: tuple[int, int], gens: list[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """[N, l, V] Gumbel(0, 1) noise, row n drawn from gens[n] only."""
    return _gumbel_(uniform_noise(shape, gens, device, dtype))


def uniform_noise(shape: tuple[int, int], gens: list[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """[N, l, V] uniform [0, 1) noise, row n drawn from gens[n] only (written in place, no stack)."""
    u = torch.empty((len(gens), *shape), device=device, dtype=dtype)
    for n, g in enumerate(gens):
        torch.rand(shape, generator=g, device=device, dtype=dtype, out=u[n])
    return u


def _gumbel_(u: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(u.dtype).tiny
    return u.clamp_(min=tiny).log_().neg_().log_().neg_()


def sample_rows(logits_NlV: torch.Tensor, params: RowParams, gens: list[torch.Generator]) -> torch.Tensor:
    """Filter, apply temperature and draw one token per position: idx [N, l] int64.

    When every row has top-k on (the default), only the k largest logits of a position can be drawn,
    so the work runs on those candidates (`torch.topk`) instead of sorting and filtering all V
    logits; the noise is the same draw from each image's generator, so both paths pick the same
    token (up to rounding of the top-p sums, and exact ties at the k-th logit beyond k candidates).
    """
    N, l, V = logits_NlV.shape
    k_cap = params.top_k_max
    if k_cap is None:
        k_cap = int(params.top_k_N.min()) and int(params.top_k_N.max())
    if 0 < k_cap < V:
        return _sample_candidates(logits_NlV, params, gens, k_cap)
    logits = filter_top_k_top_p_(logits_NlV, params.top_k_N, params.top_p_N)
    logits = logits / params.temperature_N.to(logits.dtype).view(N, 1, 1)
    noise = gumbel_noise((l, V), gens, logits.device, logits.dtype)
    return (logits + noise).argmax(dim=-1)


def _sample_candidates(logits_NlV: torch.Tensor, params: RowParams, gens: list[torch.Generator],
                       k_cap: int) -> torch.Tensor:
    """sample_rows on the k_cap largest logits of each position (every row's top_k <= k_cap)."""
    N, l, V = logits_NlV.shape
    vals_NlK, idx_NlK = logits_NlV.topk(k_cap, dim=-1)              # descending
    kth_pos = (params.top_k_N - 1).clamp(max=k_cap - 1).view(N, 1, 1).expand(N, l, 1)
    vals_NlK = vals_NlK.masked_fill(vals_NlK < vals_NlK.gather(-1, kth_pos), -torch.inf)  # ties kept
    # top-p as VAR: cumulative probability from the smallest kept logit up, drop where <= 1 - p
    cum_asc = vals_NlK.softmax(dim=-1).flip(-1).cumsum_(dim=-1).flip(-1)
    drop = cum_asc <= (1 - params.top_p_N).to(cum_asc.dtype).view(N, 1, 1)
    drop[..., 0] = False
    drop &= (params.top_p_N > 0).view(N, 1, 1)
    vals_NlK = vals_NlK.masked_fill_(drop, -torch.inf).div_(params.temperature_N.to(vals_NlK.dtype).view(N, 1, 1))
    u_NlV = uniform_noise((l, V), gens, logits_NlV.device, logits_NlV.dtype)
    pick = vals_NlK.add_(_gumbel_(u_NlV.gather(-1, idx_NlK))).argmax(dim=-1, keepdim=True)
    return idx_NlK.gather(-1, pick).squeeze(-1)
