"""On a CUDA machine: the memory plan of model/memory.py bounds what a batch really allocates, and
bench.sampler runs in bf16 (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_memory_plan_bounds_the_peak_of_a_small_batch():
    from model.memory import plan_for_pipeline
    from model.pipeline import ImageRequest, StarPipeline

    pipe = StarPipeline.load("small", device="cuda", dtype="bfloat16")
    plan = plan_for_pipeline(pipe)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    pipe.generate([ImageRequest(f"prompt {i}", seed=i) for i in range(4)])
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() <= plan.total_bytes(4)


def test_sampler_bench_on_cuda_in_bf16(capsys):
    import json

    from bench import sampler

    assert sampler.main(["--preset", "tiny", "--batch-sizes", "1,2", "--device", "cuda", "--dtype", "bf16",
                         "--reps", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    batches = [r for r in rows if r["kind"] == "batch"]
    assert [b["batch_size"] for b in batches] == [1, 2]
    assert all(b["peak_mem_kind"] == "cuda_max_allocated" and b["dtype"] == "bfloat16" for b in batches)
