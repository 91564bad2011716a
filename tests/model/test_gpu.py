"""CUDA checks (marked `gpu`; skipped where no CUDA device exists)."""
from __future__ import annotations

import io

import pytest
import torch

from model import golden
from model.pipeline import ImageRequest, StarPipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_golden_cases_match_on_cuda_float32(golden_dir, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for case in ("tiny256", "tiny1024"):
        out = io.StringIO()
        assert golden.check_case(golden_dir / case, device="cuda", out=out), out.getvalue()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_generates_on_cuda(dtype):
    pipe = StarPipeline.load("tiny", device="cuda", dtype=dtype)
    results = pipe.generate([ImageRequest("a fox", seed=1), ImageRequest("a owl", seed=2, top_k=1)])
    assert all(r.image.shape == (256, 256, 3) for r in results)


def test_batch_invariance_of_tokens_on_cuda():
    pipe = StarPipeline.load("tiny", device="cuda", dtype="float32")
    target = ImageRequest("a cat", seed=3, cfg=2.0, top_k=30, top_p=0.9)
    reqs = [ImageRequest("a dog", seed=1), target, ImageRequest("a ship", seed=2, temperature=0.5)]
    cond1, _ = pipe.encode_prompts([target.prompt])
    cond3, _ = pipe.encode_prompts([r.prompt for r in reqs])
    alone, batch = pipe.sample_tokens(cond1, [target]), pipe.sample_tokens(cond3, reqs)
    for a, b in zip(alone.idx_per_scale, batch.idx_per_scale):
        assert torch.equal(a[0], b[1])
