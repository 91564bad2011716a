"""Guidance, top-k / top-p (VAR semantics), temperature and per-image generators."""
from __future__ import annotations

import pytest
import torch

from model.sampler import RowParams, filter_top_k_top_p_, guide, make_generators, sample_rows


def reference_filter(logits_lV: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """VAR's sample_with_top_k_top_p_ filtering for one row, written out step by step."""
    x = logits_lV.clone()
    if k > 0:
        kth = x.topk(k, dim=-1).values[..., -1:]
        x[x < kth] = -torch.inf
    if p > 0:
        vals, order = x.sort(dim=-1)
        drop = vals.softmax(-1).cumsum(-1) <= 1 - p
        drop[..., -1] = False
        for pos in range(x.shape[0]):
            x[pos, order[pos][drop[pos]]] = -torch.inf
    return x


def test_per_row_filtering_matches_var_semantics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 50, generator=g) * 3
    logits[2, :, 10:14] = logits[2, :, 10:11]               # ties at the k-th value are all kept
    ks, ps = [0, 1, 12, 5, 50], [0.0, 0.0, 0.9, 0.3, 0.99]
    got = filter_top_k_top_p_(logits.clone(), torch.tensor(ks), torch.tensor(ps, dtype=torch.float64))
    for n, (k, p) in enumerate(zip(ks, ps)):
        assert torch.equal(got[n], reference_filter(logits[n], k, p)), (k, p)
    assert torch.isfinite(got[0]).all()                       # k = 0, p = 0: nothing removed
    assert (torch.isfinite(got[1]).sum(-1) == 1).all()        # k = 1: only the best stays


def test_guidance_ramps_over_scales():
    params = RowParams.build([4.0, 2.0], [0, 0], [0.0, 0.0], [1.0, 1.0], "cpu")
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    logits = torch.cat((cond, uncond))
    assert torch.equal(guide(logits, params.guidance_t(0, 10)), cond)
    t = torch.tensor([4.0 * 3 / 9, 2.0 * 3 / 9]).view(2, 1, 1)
    torch.testing.assert_close(guide(logits, params.guidance_t(3, 10)), (1 + t) * cond - t * uncond)


def test_each_row_draws_from_its_own_generator():
    logits = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1))
    params = RowParams.build([0.0] * 3, [0] * 3, [0.0] * 3, [1.0] * 3, "cpu")
    batch = sample_rows(logits.clone(), params, make_generators([7, 8, 9], "cpu"))
    one = RowParams.build([0.0], [0], [0.0], [1.0], "cpu")
    alone = sample_rows(logits[1:2].clone(), one, make_generators([8], "cpu"))
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[2])


def test_samples_follow_the_softmax_and_temperature_sharpens():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(1, 20000, 4).contiguous()
    params = RowParams.build([0.0], [0], [0.0], [1.0], "cpu")
    freq = torch.bincount(sample_rows(logits.clone(), params, make_generators([3], "cpu"))[0], minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), rtol=0, atol=0.015)
    cold = RowParams.build([0.0], [0], [0.0], [0.05], "cpu")
    freq_cold = torch.bincount(sample_rows(logits.clone(), cold, make_generators([3], "cpu"))[0], minlength=4) / 20000
    assert freq_cold[3] > 0.98


def test_greedy_takes_the_argmax_whatever_the_seed():
    logits = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(2))
    params = RowParams.build([0.0] * 2, [1, 1], [0.0] * 2, [1.0, 3.0], "cpu")
    for seeds in ([1, 2], [3, 4]):
        assert torch.equal(sample_rows(logits.clone(), params, make_generators(seeds, "cpu")), logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(top_k=[-1]), dict(top_p=[1.2]), dict(temperature=[0.0]),
                                 dict(cfg=[float("nan")])])
def test_invalid_parameters_raise(bad):
    kw = dict(cfg=[1.0], top_k=[0], top_p=[0.0], temperature=[1.0]) | bad
    with pytest.raises(ValueError):
        RowParams.build(kw["cfg"], kw["top_k"], kw["top_p"], kw["temperature"], "cpu")
