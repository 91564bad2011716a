"""The lean KV cache (every layer's prefix, one shared stretch for the last scale) computes exactly
what a cache of all L tokens per layer computes, and holds what model/memory.py predicts."""
from __future__ import annotations

import pytest
import torch

from model.autoregress import Conditioning, sample_scales
from model.kv_cache import KVCache
from model.memory import kv_cache_bytes_per_image
from model.sampler import RowParams, make_generators


def _run(tr, vae, exp, cache):
    cond = Conditioning(exp["text.hidden"][[0, 1]], exp["text.mask"][[0, 1]], exp["text.pooled"][[0, 1]],
                        exp["text.pooled"][[2, 2]])
    params = RowParams.build([4.0, 2.5], [600, 20], [0.8, 0.0], [1.0, 0.8], "cpu")
    logits = {}
    out = sample_scales(tr, vae, cond, params, make_generators([5, 6], "cpu"), cache,
                        on_logits=lambda si, lg: logits.__setitem__(si, lg.clone()))
    return out, logits


def test_lean_cache_gives_the_same_logits_and_tokens_as_a_full_cache(golden256):
    cfg, tr, vae, exp = golden256
    full = KVCache(cfg.depth, 4, cfg.num_heads, cfg.L, cfg.head_dim, torch.float32, "cpu")
    lean = KVCache.for_config(cfg, 4, torch.float32, "cpu")
    last = cfg.patch_nums[-1] ** 2
    assert full.k.shape[2] == cfg.depth * cfg.L
    assert lean.k.shape[2] == cfg.depth * (cfg.L - last) + last < full.k.shape[2]
    out_full, logits_full = _run(tr, vae, exp, full)
    out_lean, logits_lean = _run(tr, vae, exp, lean)
    assert all(torch.equal(logits_full[si], logits_lean[si]) for si in range(cfg.num_scales))
    assert all(torch.equal(a, b) for a, b in zip(out_full.idx_per_scale, out_lean.idx_per_scale))
    assert torch.equal(out_full.f_hat_NChw, out_lean.f_hat_NChw)


def test_a_layer_never_writes_into_a_prefix_still_to_be_read():
    """Position p of layer i lands in layer i-1's prefix only for the last scale (p >= prefix)."""
    cache = KVCache(depth=3, max_rows=1, num_heads=1, L=10, head_dim=1, dtype=torch.float32, device="cpu",
                    prefix_len=6)
    assert cache.k.shape[2] == 3 * 6 + 4
    for layer in range(3):                       # the prefix scales of every layer
        k, _ = cache.slots(layer, 0, 1, 6)
        k.fill_(layer)
    for layer in range(3):                       # the last scale, layer by layer
        prefix, _ = cache.prefix(layer, 1, 6)
        assert torch.all(prefix == layer), f"layer {layer}'s prefix was overwritten before it ran"
        k, _ = cache.slots(layer, 6, 1, 4)
        k.fill_(10 + layer)
        assert cache.prefix(layer, 1, 10)[0].flatten().tolist() == [layer] * 6 + [10 + layer] * 4
    with pytest.raises(IndexError, match="outside the cache"):
        cache.slots(0, 8, 1, 4)


def test_the_allocated_cache_is_what_memory_py_predicts():
    from model.config import get_preset

    for name, dtype in (("tiny", torch.float32), ("star-1024", torch.bfloat16)):
        cfg = get_preset(name)
        cache = KVCache.for_config(cfg, 2 * 3, dtype, "meta")      # 3 images; meta: shapes only
        storages = cache.k.untyped_storage().nbytes() + cache.v.untyped_storage().nbytes()
        assert storages == cache.nbytes() == 3 * kv_cache_bytes_per_image(cfg, dtype), name
    full_1024 = 2 * 30 * 2 * 9451 * 1920 * 2
    lean_1024 = kv_cache_bytes_per_image(get_preset("star-1024"), torch.bfloat16)
    assert lean_1024 / full_1024 == pytest.approx(0.581, abs=1e-3)
