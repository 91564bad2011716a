"""Per-row sampling: classifier-free guidance, top-k / top-p filtering, temperature, one RNG per image.

Filtering follows VAR's `sample_with_top_k_top_p_`: top-k keeps every logit >= the k-th largest
(ties kept); top-p sorts ascending, removes the tokens whose cumulative probability is <= 1 - p
(the most likely token always stays). k = 0 / p = 0 switch a filter off. The temperature divides
the filtered logits, then one token is drawn per position with the Gumbel-max trick using noise from
that image's own generator, so an image never depends on what else is in the batch. A draw can also
report its confidence (the drawn token's probability under the filtered distribution), which the
sampler head's refinement (model/refine.py) ranks positions by; its random commit priorities come
from the same per-image generators (`ImageRandom`).
"""
from __future__ import annotations

from collections.abc import Sequence
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
    top_k_host: tuple[int, ...] | None = None   # every row's top_k on the host, when known
    # per image, the first scale sampled without guidance (conditional row only; fast guidance);
    # None: every image guided on every scale (the official sampling)
    cfg_stop_host: tuple[int, ...] | None = None

    @classmethod
    def build(cls, cfg, top_k, top_p, temperature, device, cfg_stop: Sequence[int] | None = None) -> "RowParams":
        f64 = dict(dtype=torch.float64, device=device)
        host_k = tuple(torch.as_tensor(top_k, dtype=torch.int64).flatten().tolist())
        params = cls(torch.as_tensor(cfg, **f64), torch.as_tensor(top_k, dtype=torch.int64, device=device),
                     torch.as_tensor(top_p, **f64), torch.as_tensor(temperature, **f64), _k_cap(host_k), host_k,
                     None if cfg_stop is None else tuple(int(s) for s in cfg_stop))
        params.validate()
        return params

    def select(self, rows: Sequence[int]) -> "RowParams":
        """The parameters of the images `rows` (a list on the host)."""
        at = torch.as_tensor(list(rows), dtype=torch.int64, device=self.cfg_N.device)
        host_k = None if self.top_k_host is None else tuple(self.top_k_host[i] for i in rows)
        stops = None if self.cfg_stop_host is None else tuple(self.cfg_stop_host[i] for i in rows)
        return RowParams(self.cfg_N[at], self.top_k_N[at], self.top_p_N[at], self.temperature_N[at],
                         self.top_k_max if host_k is None else _k_cap(host_k), host_k, stops)

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
        if self.cfg_stop_host is not None and (len(self.cfg_stop_host) != self.cfg_N.shape[0]
                                               or min(self.cfg_stop_host, default=0) < 0):
            raise ValueError("cfg_stop needs one scale index >= 0 per image")

    def uncond_images(self, si: int) -> list[int] | None:
        """The images whose unconditional row runs at scale si, in row order: the rows of the scale
        are [conditional rows of all N images; unconditional rows of these]. None: all N, in image
        order (the official layout: every image is guided at scale si).

        Longest-guided first, so every scale's list is a prefix of the previous scale's: an image's
        unconditional row keeps the same KV-cache row on every scale it runs, and the rows of the
        images that stopped are simply no longer computed (their cache entries are never read)."""
        stops = self.cfg_stop_host
        if stops is None:
            return None
        order = sorted(range(len(stops)), key=lambda n: -stops[n])    # stable: ties in image order
        guided = [n for n in order if stops[n] > si]
        return None if guided == list(range(len(stops))) else guided

    def guidance_t(self, si: int, num_scales: int) -> torch.Tensor:
        """t per image at scale si: cfg * si / (S - 1), [N, 1, 1] float64."""
        ratio = si / (num_scales - 1) if num_scales > 1 else 0.0
        return (self.cfg_N * ratio)[:, None, None]

    def guidance_full(self) -> torch.Tensor:
        """t = cfg per image (not ramped: the sampler head's steps), [N, 1, 1] float64."""
        return self.cfg_N[:, None, None]


def _k_cap(host_k: Sequence[int]) -> int:
    return 0 if not host_k or min(host_k) <= 0 else max(host_k)


def make_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def guide(logits_BlV: torch.Tensor, t_N11: torch.Tensor, uncond_images: Sequence[int] | None = None) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, rows laid out [cond N; uncond N].

    With uncond_images (RowParams.uncond_images) the rows are [cond N; uncond of those images]:
    those images are guided as above (the same arithmetic), the others take their conditional
    logits as they are (what t = 0 gives)."""
    if uncond_images is None:
        N = logits_BlV.shape[0] // 2
        one_plus_t = (1 + t_N11).to(logits_BlV.dtype)
        return one_plus_t * logits_BlV[:N] - t_N11.to(logits_BlV.dtype) * logits_BlV[N:]
    N = logits_BlV.shape[0] - len(uncond_images)
    cond_NlV = logits_BlV[:N]
    if not uncond_images:
        return cond_NlV
    at = torch.as_tensor(list(uncond_images), dtype=torch.int64, device=logits_BlV.device)
    t_M11 = t_N11[at]
    guided_MlV = (1 + t_M11).to(logits_BlV.dtype) * cond_NlV[at] - t_M11.to(logits_BlV.dtype) * logits_BlV[N:]
    return cond_NlV.index_copy(0, at, guided_MlV)


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


def uniform_noise(shape: tuple[int, ...], gens: list[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """[N, *shape] uniform [0, 1) noise, row n drawn from gens[n] only (written in place, no stack)."""
    u = torch.empty((len(gens), *shape), device=device, dtype=dtype)
    for n, g in enumerate(gens):
        torch.rand(shape, generator=g, device=device, dtype=dtype, out=u[n])
    return u


def _gumbel_(u: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(u.dtype).tiny
    return u.clamp_(min=tiny).log_().neg_().log_().neg_()


class ImageRandom:
    """Every random number the sampling of N images uses; image n's come from its own generator, in
    an order fixed by its own request, so an image never depends on the rest of its batch.

    Two kinds: the Gumbel noise of a draw (one per position and token) and the uniform priorities
    of a refinement step that commits random positions. The golden checker substitutes a subclass
    (argmax draws, the official run's priorities); nothing else changes between the two.
    """

    def __init__(self, gens: Sequence[torch.Generator]):
        self.gens = list(gens)

    def __len__(self) -> int:
        return len(self.gens)

    def select(self, rows: Sequence[int]) -> "ImageRandom":
        """The random numbers of the images `rows` (the same generators, not copies)."""
        return ImageRandom([self.gens[i] for i in rows])

    def gumbel(self, l: int, V: int, device, dtype, at_NlK: torch.Tensor | None = None) -> torch.Tensor:
        """Gumbel noise of every position and token [N, l, V], or only at the tokens at_NlK [N, l, K]
        (the same numbers: all l*V uniforms are drawn either way)."""
        u_NlV = uniform_noise((l, V), self.gens, device, dtype)
        return _gumbel_(u_NlV if at_NlK is None else u_NlV.gather(-1, at_NlK))

    def priorities(self, si: int, step: int, l: int, device) -> torch.Tensor:
        """Uniform [0, 1) priorities [N, l] of step `step` of scale si (float32)."""
        return uniform_noise((l,), self.gens, device, torch.float32)


def as_random(gens: "ImageRandom | Sequence[torch.Generator]") -> ImageRandom:
    return gens if isinstance(gens, ImageRandom) else ImageRandom(gens)


@dataclass
class Filtered:
    """Guided logits of N images after top-k / top-p and temperature, ready to draw from: either the
    k_cap largest logits of every position (vals_NlK descending, -inf where filtered out, tokens
    idx_NlK) or all V logits (idx_NlK None). Drawing several times reuses the filtering."""

    vals_NlK: torch.Tensor
    idx_NlK: torch.Tensor | None
    vocab_size: int

    def draw(self, rand: ImageRandom, confidence: bool = False):
        """One token per position, Gumbel-max with each image's noise: idx [N, l] int64, and with
        confidence=True also that token's probability under the filtered distribution [N, l]."""
        l = self.vals_NlK.shape[1]
        noise = rand.gumbel(l, self.vocab_size, self.vals_NlK.device, self.vals_NlK.dtype, self.idx_NlK)
        pick_Nl1 = (self.vals_NlK + noise).argmax(dim=-1, keepdim=True)
        idx_Nl = (pick_Nl1 if self.idx_NlK is None else self.idx_NlK.gather(-1, pick_Nl1)).squeeze(-1)
        if not confidence:
            return idx_Nl
        return idx_Nl, self.vals_NlK.softmax(dim=-1).gather(-1, pick_Nl1).squeeze(-1)


def filter_rows(logits_NlV: torch.Tensor, params: RowParams, inplace: bool = True) -> Filtered:
    """Filtering and temperature of sample_rows (inplace=False leaves logits_NlV untouched).

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
        return _candidates(logits_NlV, params, k_cap)
    logits = filter_top_k_top_p_(logits_NlV if inplace else logits_NlV.clone(), params.top_k_N, params.top_p_N)
    return Filtered(logits / params.temperature_N.to(logits.dtype).view(N, 1, 1), None, V)


def sample_rows(logits_NlV: torch.Tensor, params: RowParams,
                gens: "ImageRandom | Sequence[torch.Generator]") -> torch.Tensor:
    """Filter, apply temperature and draw one token per position: idx [N, l] int64 (may modify
    logits_NlV in place)."""
    return filter_rows(logits_NlV, params).draw(as_random(gens))


def _candidates(logits_NlV: torch.Tensor, params: RowParams, k_cap: int) -> Filtered:
    """The k_cap largest logits of each position, filtered as VAR does (every row's top_k <= k_cap)."""
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
    return Filtered(vals_NlK, idx_NlK, V)
