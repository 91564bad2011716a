"""bench.sampler on the tiny preset: valid JSON lines with every key and sane values, and a plot."""
from __future__ import annotations

import json

from bench import sampler

KEYS = {"batch_size", "images_per_s", "s_per_image", "peak_mem_bytes", "flops_per_image",
        "token_stage_fraction_of_matmul_peak", "fraction_of_matmul_peak", "matmul_flops_per_s",
        "stages_s", "per_scale", "token_stage_s", "png_s_per_image"}


def test_sampler_bench_on_tiny_emits_one_json_line_per_batch(capsys, tmp_path):
    plot = tmp_path / "sampler.png"
    out = tmp_path / "runs.jsonl"
    assert sampler.main(["--preset", "tiny", "--batch-sizes", "1,2", "--device", "cpu", "--dtype", "float32",
                         "--reps", "1", "--warmup", "0", "--json", "--plot", str(plot), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in lines] == ["machine", "batch", "batch", "summary"]
    machine = lines[0]
    assert machine["matmul_flops_per_s"] > 1e8 and machine["torch"] and machine["cpu_count"] >= 1
    batches = lines[1:3]
    assert [b["batch_size"] for b in batches] == [1, 2]
    for b in batches:
        assert KEYS <= set(b), KEYS - set(b)
        assert b["images_per_s"] > 0 and abs(b["s_per_image"] * b["images_per_s"] - 1) < 1e-9
        assert 0 < b["token_stage_fraction_of_matmul_peak"] < 1.5     # a ratio, not a raw FLOP/s figure
        assert b["peak_mem_bytes"] > 10 * 2**20
        assert 1.5e9 < b["flops_per_image"] < 2.5e9                   # tiny: ~1.8 GFLOP of matmuls per image
        assert set(b["stages_s"]) == {"text_encode_s", "token_s", "decode_s", "png_s"}
        assert all(v > 0 for v in b["stages_s"].values())
        assert [s["tokens"] for s in b["per_scale"]] == [p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
        assert all(s["transformer_s"] > 0 and s["sampling_s"] > 0 for s in b["per_scale"])
    assert lines[-1]["best_batch_size"] in (1, 2)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(out.read_text().splitlines()) == 4


def test_size_must_match_the_preset(capsys):
    assert sampler.main(["--preset", "tiny", "--size", "512", "--batch-sizes", "1", "--device", "cpu"]) == 2
    assert "256 px" in capsys.readouterr().err


def test_until_oom_doubles_past_the_list_and_stops_at_the_first_oom(capsys, monkeypatch):
    import torch

    def fake_batch(pipe, n, args, peak, flops, sampler="auto", stop=None):
        if n > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return {"kind": "batch", "batch_size": n, "images_per_s": float(n), "s_per_image": 1.0 / n,
                "token_stage_fraction_of_matmul_peak": 0.5}

    monkeypatch.setattr(sampler, "bench_batch", fake_batch)
    assert sampler.main(["--preset", "tiny", "--batch-sizes", "1,2", "--until-oom", "--device", "cpu", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kind"], r.get("batch_size")) for r in lines] == [
        ("machine", None), ("batch", 1), ("batch", 2), ("batch", 4), ("oom", 8), ("summary", None)]
    assert lines[-1]["best_batch_size"] == 4


def test_sampler_bench_reports_head_and_plain_and_what_the_head_costs(capsys):
    assert sampler.main(["--preset", "tiny-sampler", "--sampler", "plain,head", "--batch-sizes", "1",
                         "--device", "cpu", "--dtype", "float32", "--reps", "1", "--warmup", "0", "--no-decode",
                         "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kind"], r.get("sampler")) for r in lines] == [
        ("machine", None), ("batch", "plain"), ("summary", "plain"), ("batch", "head"), ("summary", "head"),
        ("sampler_cost", None)]
    plain, head, cost = lines[1], lines[3], lines[-1]
    assert head["flops_per_image"] > plain["flops_per_image"]
    assert cost["flops_head_over_plain"] == head["flops_per_image"] / plain["flops_per_image"] > 1
    assert cost["s_per_image_head_over_plain"] > 0 and cost["batch_size"] == 1
    refined = [s["refine_s"] > 0 for s in head["per_scale"]]
    assert refined == [False] * 7 + [True] * 3 and not any(s["refine_s"] for s in plain["per_scale"])
    assert all(s["transformer_s"] > 0 for s in head["per_scale"])


def test_head_sampler_needs_a_model_with_a_head(capsys):
    assert sampler.main(["--preset", "tiny", "--sampler", "head", "--batch-sizes", "1", "--device", "cpu"]) == 2
    assert "needs a model with a sampler head" in capsys.readouterr().err
