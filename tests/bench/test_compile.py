"""model/compile.py: buckets, padding and the compiled step (dynamo tracing with the eager backend,
so the test needs no C++ compiler; fullgraph=True proves the step compiles without graph breaks)."""
from __future__ import annotations

import torch

from model.compile import (bucket_for, compile_pipeline, default_buckets, pad_rows, uncompile_pipeline, unpad_rows,
                           warm_up)
from model.pipeline import ImageRequest, StarPipeline


def test_buckets():
    assert default_buckets(1) == (1,) and default_buckets(8) == (1, 2, 4, 8) and default_buckets(12) == (1, 2, 4, 8, 12)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]


def test_padding_keeps_conditional_and_unconditional_rows_apart():
    x = torch.arange(6.0).view(6, 1, 1)             # 3 images: cond rows 0..2, uncond rows 3..5
    padded = pad_rows(x, 3, 4)
    assert padded.flatten().tolist() == [0, 1, 2, 0, 3, 4, 5, 3]
    assert torch.equal(unpad_rows(padded, 3, 4), x)


def test_compiled_step_with_padding_gives_the_same_tokens():
    pipe = StarPipeline.load("tiny")
    requests = [ImageRequest("a fox", seed=1), ImageRequest("a boat", seed=2, top_k=5),
                ImageRequest("greedy", seed=3, top_k=1, top_p=0.0)]
    cond, _ = pipe.encode_prompts([r.prompt for r in requests])
    eager = pipe.sample_tokens(cond, requests)
    step = compile_pipeline(pipe, (1, 4), backend="eager", fullgraph=True)
    assert pipe._cache.max_rows == 8                    # reserved for the largest bucket
    compiled = pipe.sample_tokens(cond, requests)       # 3 images run in the bucket of 4
    assert all(torch.equal(a, b) for a, b in zip(eager.idx_per_scale, compiled.idx_per_scale))
    assert step._text_pad.kv[0][0].shape[0] == 4
    assert set(warm_up(pipe, [4])) == {4}
    uncompile_pipeline(pipe)
    assert "scale_logits" not in pipe.transformer.__dict__


def test_a_compiled_pipeline_gives_head_images_the_same_tokens():
    """Batches with sampler-head images run eagerly (the compiled step pads rows and returns logits
    only); plain batches still use the compiled step."""
    pipe = StarPipeline.load("tiny-sampler")
    requests = [ImageRequest("a fox", seed=1, sampler="head"), ImageRequest("a boat", seed=2, sampler="plain"),
                ImageRequest("a cow", seed=3, sampler="head", top_k=5)]
    cond, _ = pipe.encode_prompts([r.prompt for r in requests])
    eager = pipe.sample_tokens(cond, requests)
    compile_pipeline(pipe, (4,), backend="eager")
    try:
        calls = []
        step = pipe.transformer.scale_logits
        pipe.transformer.scale_logits = lambda *a: calls.append(a[1]) or step(*a)
        compiled = pipe.sample_tokens(cond, requests)       # 3 images; the bucket of 4 is not used
        assert calls == []
        assert all(torch.equal(a, b) for a, b in zip(eager.idx_per_scale, compiled.idx_per_scale))
        one, _ = pipe.encode_prompts(["plain"])
        pipe.sample_tokens(one, [ImageRequest("plain", seed=4, sampler="plain")])
        assert calls == list(range(10))
    finally:
        uncompile_pipeline(pipe)
