"""StarPipeline as the worker uses it (docs/CONTRACTS.md), on the tiny preset, CPU float32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.pipeline import ImageRequest, ImageResult, StarPipeline


def test_tiny_loads_and_describes_itself():
    pipe = StarPipeline.load("tiny")
    assert (pipe.name, pipe.image_size, pipe.patch_nums) == ("tiny", 256, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32


def test_tiny_weights_are_deterministic(tiny_pipe):
    other = StarPipeline.load("tiny")
    for (k, a), b in zip(tiny_pipe.transformer.state_dict().items(), other.transformer.state_dict().values()):
        assert torch.equal(a, b), k


def test_generate_returns_one_uint8_image_per_request(tiny_pipe):
    long_prompt = " ".join(["word"] * 80)  # byte-level tokenizer: far more than 77 tokens
    results = tiny_pipe.generate([ImageRequest("a red cube", seed=1), ImageRequest(long_prompt, seed=2)])
    assert [type(r) for r in results] == [ImageResult, ImageResult]
    for r in results:
        assert r.image.shape == (256, 256, 3) and r.image.dtype == np.uint8 and not r.canceled
    assert [r.prompt_truncated for r in results] == [False, True]
    assert not np.array_equal(results[0].image, results[1].image)
    assert tiny_pipe.generate([]) == []


def test_same_request_gives_the_same_tokens_and_the_seed_matters(tiny_pipe):
    req = ImageRequest("a lighthouse", seed=7)
    first, again = _tokens(tiny_pipe, [req]), _tokens(tiny_pipe, [req])
    other_seed = _tokens(tiny_pipe, [ImageRequest("a lighthouse", seed=8)])
    assert all(torch.equal(a, b) for a, b in zip(first.idx_per_scale, again.idx_per_scale))
    assert not torch.equal(first.idx_per_scale[-1], other_seed.idx_per_scale[-1])


def _tokens(pipe, requests):
    cond, _ = pipe.encode_prompts([r.prompt for r in requests], [r.negative_prompt for r in requests])
    return pipe.sample_tokens(cond, requests)


def test_unset_sampling_fields_get_the_models_recommendation_else_the_official_values(tiny_pipe):
    bare = ImageRequest("a lighthouse", seed=7)
    official = ImageRequest("a lighthouse", seed=7, cfg=4.0, top_k=600, top_p=0.8, temperature=1.0, sampler="plain")
    assert tiny_pipe.sampling == {} and tiny_pipe.with_defaults(bare) == official
    assert torch.equal(_tokens(tiny_pipe, [bare]).f_hat_NChw, _tokens(tiny_pipe, [official]).f_hat_NChw)
    tiny_pipe.sampling = {"cfg": 1.5, "top_k": 1}         # as a model directory's config.json would
    try:
        recommended = ImageRequest("a lighthouse", seed=7, cfg=1.5, top_k=1, top_p=0.8, temperature=1.0,
                                   sampler="plain")
        assert tiny_pipe.with_defaults(bare) == recommended
        bare_f_hat = _tokens(tiny_pipe, [bare]).f_hat_NChw
        assert torch.equal(bare_f_hat, _tokens(tiny_pipe, [recommended]).f_hat_NChw)
        assert not torch.equal(bare_f_hat, _tokens(tiny_pipe, [official]).f_hat_NChw)
        assert tiny_pipe.with_defaults(ImageRequest("x", 1, cfg=2.0, top_k=0)) == \
            ImageRequest("x", 1, cfg=2.0, top_k=0, top_p=0.8, temperature=1.0, sampler="plain")  # explicit values win
    finally:
        tiny_pipe.sampling = {}


def test_batch_invariance_same_seed_alone_or_among_others(tiny_pipe):
    """Same request alone and inside a batch of 4 with other prompts and parameters: same tokens."""
    target = ImageRequest("a cat on a sofa", seed=1234, cfg=3.0, top_k=40, top_p=0.9, temperature=1.2)
    others = [ImageRequest("a dog", seed=1, cfg=1.0, top_k=0, top_p=0.0),
              ImageRequest("mountains at dawn", seed=2, negative_prompt="blurry", top_k=5, top_p=0.5, temperature=0.7),
              ImageRequest("a cat on a sofa", seed=99, cfg=6.0, top_k=600, top_p=0.8)]
    alone = _tokens(tiny_pipe, [target])
    batch = _tokens(tiny_pipe, [others[0], target, others[1], others[2]])
    for si in range(len(tiny_pipe.patch_nums)):
        assert torch.equal(alone.idx_per_scale[si][0], batch.idx_per_scale[si][1]), f"scale {si}"
    assert torch.equal(alone.f_hat_NChw[0], batch.f_hat_NChw[1])
    # the other rows really differ, so the batch was not trivially identical
    assert not torch.equal(batch.idx_per_scale[-1][1], batch.idx_per_scale[-1][3])


def _scale0_logits(pipe, request):
    cond, _ = pipe.encode_prompts([request.prompt], [request.negative_prompt])
    seen = {}
    pipe.sample_tokens(cond, [request], on_logits=lambda si, lg: seen.setdefault(si, lg.clone()))
    return seen[0]  # [2, 1, V]: conditional row, unconditional row


def test_negative_prompt_replaces_the_unconditional_branch(tiny_pipe):
    plain = _scale0_logits(tiny_pipe, ImageRequest("a house", seed=5))
    negative = _scale0_logits(tiny_pipe, ImageRequest("a house", seed=5, negative_prompt="fog"))
    assert torch.equal(plain[0], negative[0])  # the conditional row does not see the negative prompt
    assert not torch.allclose(plain[1], negative[1], atol=1e-4)


def test_greedy_ignores_the_seed(tiny_pipe):
    a = _tokens(tiny_pipe, [ImageRequest("a boat", seed=1, top_k=1, top_p=0.0)])
    b = _tokens(tiny_pipe, [ImageRequest("a boat", seed=2, top_k=1, top_p=0.0)])
    assert all(torch.equal(x, y) for x, y in zip(a.idx_per_scale, b.idx_per_scale))


def test_cancel_reports_canceled_and_leaves_others_unchanged(tiny_pipe):
    reqs = [ImageRequest("one", seed=1), ImageRequest("two", seed=2)]
    calls = []

    def on_scale(k, S):
        calls.append((k, S))
        return [0] if k == 3 else None

    canceled_run = tiny_pipe.generate(reqs, on_scale=on_scale)
    assert calls == [(k, 10) for k in range(1, 11)]
    assert canceled_run[0].canceled and canceled_run[0].image is None
    assert not canceled_run[1].canceled
    assert np.array_equal(canceled_run[1].image, tiny_pipe.generate(reqs[1:])[0].image)


def test_canceling_everything_stops_the_loop(tiny_pipe):
    calls = []
    results = tiny_pipe.generate([ImageRequest("x", seed=1)], on_scale=lambda k, S: calls.append(k) or [0])
    assert calls == [1] and results[0].canceled and results[0].image is None


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=1.5), dict(temperature=0.0)])
def test_invalid_parameters_are_rejected(tiny_pipe, bad):
    with pytest.raises(ValueError):
        tiny_pipe.generate([ImageRequest("x", seed=1, **bad)])


def test_unknown_spec_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        StarPipeline.load(str(tmp_path / "missing"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_with_float32_logits(dtype):
    pipe = StarPipeline.load("tiny", dtype=dtype)
    assert pipe.transformer.blocks[0].attn.mat_qkv.weight.dtype == dtype
    assert pipe.transformer.head_logits.weight.dtype == torch.float32
    seen = []
    cond, _ = pipe.encode_prompts(["a tree"])
    out = pipe.sample_tokens(cond, [ImageRequest("a tree", seed=3)], on_logits=lambda si, lg: seen.append(lg.dtype))
    assert set(seen) == {torch.float32} and out.f_hat_NChw.dtype == torch.float32
    img = pipe.decode(out.f_hat_NChw[:, :, :4, :4])  # a corner is enough to check dtypes (and cheap)
    assert img.dtype == torch.float32 and bool(torch.isfinite(img).all())
