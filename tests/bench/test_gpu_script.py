"""bench/gpu.sh and bench.agreement, run on CPU with the tiny preset (every Python piece of the GPU
script; the real run needs CUDA and the star-1024 preset)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import agreement

ROOT = Path(__file__).resolve().parents[2]


def test_bf16_tokens_agree_with_float32_on_tiny(capsys, tmp_path):
    assert agreement.main(["--preset", "tiny", "--device", "cpu", "--dtype", "bf16", "--images", "2", "--json",
                           "--plot", str(tmp_path / "a.png")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["kind"], rec["dtype"], rec["ref_dtype"]) == ("agreement", "bfloat16", "float32")
    assert rec["tokens_compared"] == 2 * sum(p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert rec["teacher_forced_top1_agreement"] > 0.85
    assert rec["teacher_forced_ref_top1_in_top5"] > 0.98
    assert 0 < rec["logits_rel_rms_err"] < 0.05                  # bf16 rounding, not a broken path
    assert rec["greedy_per_scale"][0] == 1.0 and 0 < rec["greedy_token_agreement"] <= 1
    assert len(rec["per_scale"]) == 10
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(900)   # six Python processes, each importing torch and transformers: minutes on a busy CPU
def test_gpu_script_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DEVICE": "cpu", "ALLOW_CPU": "1",
           "PRESET": "tiny", "AGREE_PRESET": "tiny", "AGREE_IMAGES": "1", "DTYPES": "float32",
           "BATCHES": "1", "REPS": "1", "WARMUP": "0", "COMPILE": "1", "COMPILE_DTYPES": "float32",
           "COMPILE_BACKEND": "eager", "SAMPLER_ARGS": "--no-breakdown --no-decode", "DECODE_BATCH": "2",
           "DECODE_REPS": "1", "PNG_ARGS": "--images noise --options pillow-6,up+isal-1 --reps 1",
           "FAST_GUIDANCE_STOPS": "7", "FAST_GUIDANCE_BATCHES": "1"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["agreement-float32.jsonl", "decode.jsonl", "fast-guidance-float32.jsonl", "png.jsonl", "report.md",
                     "sampler-float32-compiled.jsonl", "sampler-float32-compiled.png", "sampler-float32.jsonl",
                     "sampler-float32.png"]
    decode = json.loads((out / "decode.jsonl").read_text())
    assert (decode["kind"], decode["batch_size"], decode["bit_identical"]) == ("decode", 2, True)
    pngs = [json.loads(line) for line in (out / "png.jsonl").read_text().splitlines()]
    assert {r["option"] for r in pngs if r["kind"] == "png"} == {"pillow-6", "up+isal-1"}
    assert all(r["pixels_equal"] and r["text_ok"] for r in pngs if r["kind"] == "png")
    compiled = [json.loads(line) for line in (out / "sampler-float32-compiled.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in compiled][:2] == ["machine", "compile"]
    assert all(r["compile"] for r in compiled if r["kind"] == "batch")
    report = (out / "report.md").read_text()
    assert "| tiny | cpu | float32 | True |" in report and "agreement float32 vs float32" in report
    assert "decode (tiny, cpu, batch 2)" in report and "png noise up+isal-1" in report
    fast = [json.loads(line) for line in (out / "fast-guidance-float32.jsonl").read_text().splitlines()]
    assert [(r["guidance_stop_scale"], r["batch_size"]) for r in fast if r["kind"] == "batch"] == [(None, 1), (7, 1)]
    (cost,) = [r for r in fast if r["kind"] == "guidance_stop_cost"]
    assert cost["guidance_stop_scale"] == 7 and cost["flops_fast_over_full"] < 1
    assert "| fast-guidance-float32.jsonl | plain | 1 | 7 |" in report


def test_gpu_script_refuses_to_run_without_cuda_unless_allowed(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "x")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3 and "no CUDA device" in done.stderr and f"(torch {torch.__version__})" in done.stderr
