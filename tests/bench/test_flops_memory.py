"""The FLOP counter against a hand count and torch's FlopCounterMode; the memory plan against
the real tensors."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import TextEncoderShape, decoder_flops, generation_flops, scale_flops
from model.config import StarConfig
from model.memory import kv_cache_bytes_per_image, plan_for_config, plan_for_pipeline, transformer_params

# depth 1, one head of 64 (C = 64, FFN 256), two scales (1 + 4 tokens), V 8, Cvae 4, text 8 wide x 3 tokens
TOY = StarConfig(name="toy", depth=1, patch_nums=(1, 2), vocab_size=8, vae_channels=4, text_dim=8, text_len=3)


def test_flops_of_a_toy_shape_by_hand():
    C, B, N = 64, 2, 1
    # scale 1: l = 4 new tokens attending to e = 5 cached tokens
    l, e = 4, 5
    by_hand = {
        "self_attn_linear": 2 * B * l * C * 3 * C + 2 * B * l * C * C,      # QKV + projection
        "self_attn_scores": 2 * 2 * B * l * e * C,                          # QK^T + AV, all heads
        "cross_attn_linear": 2 * (2 * N * l * C * C),                       # q + projection, cond rows
        "cross_attn_scores": 2 * 2 * N * l * 3 * C,                         # against T = 3 text tokens
        "ffn": 2 * (2 * B * l * C * 256),
        "head": 2 * B * l * C * 8,
        "word_embed": 2 * N * l * 4 * C,
    }
    assert scale_flops(TOY, 1) == by_hand
    assert scale_flops(TOY, 0)["word_embed"] == 0 and scale_flops(TOY, 0)["self_attn_scores"] == 2 * 2 * B * 1 * 1 * C
    g = generation_flops(TOY, images=1)
    assert g["parts"]["text_kv"] == 2 * 3 * 8 * 2 * C and g["parts"]["start_tokens"] == 2 * B * 8 * C
    assert g["total"] == sum(g["per_scale"]) + g["parts"]["text_kv"] + g["parts"]["start_tokens"]
    two = generation_flops(TOY, images=2)
    assert two["total"] == 2 * g["total"] and two["per_image"] == g["total"]
    clip = TextEncoderShape(layers=1, hidden=8, intermediate=16, tokens=3)
    assert clip.flops_per_text() == 2 * 3 * 8 * 24 + 2 * 3 * 8 * 8 + 2 * 2 * 3 * 8 * 16 + 2 * 2 * 3 * 3 * 8
    assert generation_flops(TOY, 2, clip)["parts"]["text_encoder"] == 3 * clip.flops_per_text()  # 2 prompts + ""


def test_linear_flops_equal_what_torch_counts_on_the_tiny_model(tiny_pipe):
    from model.pipeline import ImageRequest

    reqs = [ImageRequest("a", seed=1), ImageRequest("b", seed=2)]
    cond, _ = tiny_pipe.encode_prompts(["a", "b"], ["", ""])
    counter = FlopCounterMode(display=False)
    with counter:
        tiny_pipe.sample_tokens(cond, reqs)
    counted = counter.get_flop_counts()["Global"]
    ours = generation_flops(tiny_pipe.cfg, images=2)["parts"]
    linear = sum(v for k, v in ours.items() if "scores" not in k and k != "word_embed")
    assert counted[torch.ops.aten.addmm] == linear
    assert counted[torch.ops.aten.bmm] == ours["word_embed"]


def test_decoder_flops_of_the_tiny_vae_are_plausible():
    from model.config import get_preset

    tiny, small = decoder_flops(get_preset("tiny")), decoder_flops(get_preset("small"))
    assert 1e9 < tiny < small
    assert small == pytest.approx(394e9, rel=0.01)         # the real VQ-VAE at 256 px


def test_memory_plan_matches_the_real_tensors(tiny_pipe):
    cfg = tiny_pipe.cfg
    body, head = transformer_params(cfg)
    assert body + head == sum(p.numel() for p in tiny_pipe.transformer.parameters())
    cache = tiny_pipe.reserve(3)
    allocated = cache.k.untyped_storage().nbytes() + cache.v.untyped_storage().nbytes()
    assert allocated == 3 * kv_cache_bytes_per_image(cfg, torch.float32) == cache.nbytes()
    plan = plan_for_pipeline(tiny_pipe)
    assert plan.weights_bytes >= sum(p.numel() * 4 for p in tiny_pipe.transformer.parameters())
    free = plan.decode_bytes + 10 * plan.per_image_bytes
    assert plan.max_batch(int(free / 0.9) + 1, margin=0.1) == 10
    assert plan.max_batch(plan.decode_bytes, margin=0.0) == 0


def test_memory_plan_of_star_1024_in_bf16():
    from model.config import get_preset

    plan = plan_for_config(get_preset("star-1024"), torch.bfloat16)
    # K and V, 2 rows, 1920 wide, bf16: 30 layers x the 5355 prefix tokens + one 4096-token stretch
    # for the last scale (a full cache would hold 30 x 9451 tokens: 4.06 GiB instead of 2.36 GiB)
    assert plan.kv_cache_bytes_per_image == 2 * 2 * 1920 * (30 * 5355 + 4096) * 2
    assert 30 <= plan.max_batch(141 * 10**9, margin=0.1, weights_loaded=False) <= 40   # 22 with a full cache


@pytest.fixture(scope="module")
def head_pipe():
    from model.pipeline import StarPipeline

    return StarPipeline.load("tiny-sampler")


def test_sampler_head_flops_equal_what_torch_counts(head_pipe):
    """The head's linear layers, counted by torch: a head run minus a plain run of the same image."""
    from model.pipeline import ImageRequest

    cond, _ = head_pipe.encode_prompts(["a"], [""])
    counted = {}
    for sampler in ("plain", "head"):
        counter = FlopCounterMode(display=False)
        with counter:
            head_pipe.sample_tokens(cond, [ImageRequest("a", seed=1, sampler=sampler)])
        counted[sampler] = counter.get_flop_counts()["Global"]
    ours = generation_flops(head_pipe.cfg, images=1, head_images=1)["parts"]
    plain = generation_flops(head_pipe.cfg, images=1)["parts"]
    head_linear = sum(v for k, v in ours.items() if k.startswith("head_") and "scores" not in k)
    assert counted["head"][torch.ops.aten.addmm] - counted["plain"][torch.ops.aten.addmm] == head_linear
    assert {k: v for k, v in ours.items() if not k.startswith("head_")} == plain
    # tiny-sampler: 3 head steps on scales 7 and 8 (10x10, 13x13), 15 on scale 9 (16x16); C = 128
    assert ours["head_proj"] == 3 * sum(2 * 2 * (1 + p * p) * 256 * 128 for p in (10, 13)) \
        + 15 * 2 * 2 * (1 + 16 * 16) * 256 * 128


def test_memory_plan_counts_the_sampler_head(head_pipe):
    from model.config import get_preset
    from model.memory import sampler_head_params

    assert sum(sampler_head_params(head_pipe.cfg)) == sum(p.numel() for p in head_pipe.sampler_head.parameters())
    assert sampler_head_params(get_preset("tiny")) == (0, 0)
    with_head, without = plan_for_pipeline(head_pipe), plan_for_config(head_pipe.cfg.replace(sampler_head=None),
                                                                       torch.float32)
    assert with_head.step_bytes_per_image > without.step_bytes_per_image
    release = plan_for_config(get_preset("star-1024-sampler"), torch.bfloat16)
    base = plan_for_config(get_preset("star-1024"), torch.bfloat16)
    assert 140e6 * 2 < release.weights_bytes - base.weights_bytes < 160e6 * 2 + 4 * 1920 * 4096 * 2   # ~150 M


@pytest.mark.parametrize("stop", [0, 4, 9])
def test_fast_guidance_flops_equal_what_torch_counts(tiny_pipe, stop):
    """With every image unguided from `stop` on, the counted linear FLOPs are what the model runs."""
    from model.pipeline import ImageRequest

    reqs = [ImageRequest("a", seed=1, cfg_stop_scale=stop), ImageRequest("b", seed=2, cfg_stop_scale=stop)]
    cond, _ = tiny_pipe.encode_prompts(["a", "b"], ["", ""])
    counter = FlopCounterMode(display=False)
    with counter:
        tiny_pipe.sample_tokens(cond, reqs)
    ours = generation_flops(tiny_pipe.cfg, images=2, guidance_stop=stop)["parts"]
    linear = sum(v for k, v in ours.items() if "scores" not in k and k != "word_embed")
    assert counter.get_flop_counts()["Global"][torch.ops.aten.addmm] == linear


def test_fast_guidance_flop_table_of_star_1024():
    from bench.flops import guidance_stop_table
    from model.config import PRESETS

    rows = guidance_stop_table(PRESETS["star-1024"])
    assert [r["guidance_stop_scale"] for r in rows] == list(range(15))
    fractions = [r["fraction_of_full_guidance"] for r in rows]
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert 0.5 < fractions[0] < 0.55          # cross-attention never ran twice: not quite half
    assert 0.7 < fractions[13] < 0.8          # the 64x64 scale alone is a quarter of the work
    no_guidance = generation_flops(PRESETS["star-1024"], guidance=False)["per_image"]
    assert rows[0]["flops_per_image"] == no_guidance
