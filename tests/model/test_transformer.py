"""The cached scale-by-scale loop computes exactly what one block-causal full-sequence pass computes."""
from __future__ import annotations

import torch

from model.autoregress import Conditioning, sample_scales
from model.kv_cache import KVCache
from model.sampler import RowParams, make_generators


def _cond(exp, rows):
    return Conditioning(exp["text.hidden"][rows], exp["text.mask"][rows], exp["text.pooled"][rows],
                        exp["text.pooled"][[2] * len(rows)])


def _sample(tr, vae, cond, cache=None, seeds=(11, 12)):
    n = cond.num_images
    logits = {}
    params = RowParams.build([4.0, 2.5][:n], [600, 20][:n], [0.8, 0.0][:n], [1.0, 0.8][:n], "cpu")
    cache = cache or KVCache.for_config(tr.cfg, 2 * n, torch.float32, "cpu")
    out = sample_scales(tr, vae, cond, params, make_generators(list(seeds[:n]), "cpu"), cache,
                        on_logits=lambda si, lg: logits.__setitem__(si, lg.clone()))
    return out, logits


def test_cached_incremental_logits_equal_full_block_causal_forward(golden256):
    cfg, tr, vae, exp = golden256
    cond = _cond(exp, [0, 1])
    out, cached = _sample(tr, vae, cond)
    f_inputs = vae.teacher_forcing_inputs(out.idx_per_scale)          # [N, L-1, Cvae]
    assert f_inputs.shape == (2, cfg.L - 1, cfg.vae_channels)
    with torch.inference_mode():
        text = tr.text_kv(cond.hidden_NTD, cond.mask_NT)
        pooled = torch.cat((cond.pooled_cond_ND, cond.pooled_uncond_ND))
        full = tr(pooled, text, torch.cat((f_inputs, f_inputs)))      # [2N, L, V]
    for si, (b, e) in enumerate(cfg.begin_ends):
        torch.testing.assert_close(cached[si], full[:, b:e], rtol=0, atol=2e-5, msg=f"scale {si}")


def test_the_cache_is_reused_without_stale_reads(golden256):
    cfg, tr, vae, exp = golden256
    shared = KVCache.for_config(cfg, 6, torch.float32, "cpu")
    _sample(tr, vae, _cond(exp, [1, 0]), cache=shared)                # fills rows 0..3 with other data
    reused, _ = _sample(tr, vae, _cond(exp, [0]), cache=shared)
    fresh, _ = _sample(tr, vae, _cond(exp, [0]))
    assert all(torch.equal(a, b) for a, b in zip(reused.idx_per_scale, fresh.idx_per_scale))


def test_cross_attention_stays_within_each_request(golden256):
    """Rows of B in the batch [A, B] see B's text only: same logits as B alone."""
    cfg, tr, vae, exp = golden256
    greedy = RowParams.build([4.0, 4.0], [1, 1], [0.0, 0.0], [1.0, 1.0], "cpu")
    seen = {}
    sample_scales(tr, vae, _cond(exp, [0, 1]), greedy, make_generators([0, 1], "cpu"),
                  KVCache.for_config(cfg, 4, torch.float32, "cpu"), on_logits=lambda si, lg: seen.setdefault(si, lg))
    for si in (0, 3, 9):
        both = torch.stack((seen[si][1], seen[si][3]))                # B's conditional and unconditional rows
        torch.testing.assert_close(both, exp[f"B.logits_cond_uncond.{si}"], rtol=0, atol=1e-4)
