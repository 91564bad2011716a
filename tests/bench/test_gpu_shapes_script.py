"""bench/gpu_shapes.sh dry-run on CPU with a few hundred images and seconds of training: every step
of the GPU retraining script (data from the shipped VQ-VAE, a time-budgeted recipe, its sampling
sweep, the collected weights and logs), so the one real run on a lent GPU does not fail on a typo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


IMAGES = "40"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One work directory for the module: the script's data step (latents and tokens of IMAGES
    images) runs once, and the next run finds it done; each run trains recipes of its own names."""
    return tmp_path_factory.mktemp("gpu-shapes-work")


@pytest.mark.timeout(900)   # five Python processes, each importing torch and transformers: minutes on a busy CPU
def test_gpu_shapes_script_dry_run_on_cpu(tmp_path, work):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "IMAGES": IMAGES, "AR_SECONDS": "2",
           "WORKERS": "2", "PROMPTS": "1", "SWEEP_SEEDS": "100", "SWEEP": "--cfg 1.5,3",
           "CONFIGS": "tiny:ar_batch=4,arch.depth=2", "WORK": str(work), "OUT": str(out)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_shapes.sh")], env=env, capture_output=True, text=True,
                          timeout=840)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["shapes-runs.tgz", "weights-tiny.pt"]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["config"] == "tiny" and summary["steps"] > 0 and summary["seconds"] >= 2
    assert sorted(r["sampling"]["cfg"] for r in summary["sweep"]) == [1.5, 3.0]
    weights = torch.load(out / "weights-tiny.pt", weights_only=True)
    assert weights["recipe"]["arch"]["depth"] == 2 and weights["recipe"]["images"] == int(IMAGES)
    assert weights["step"] == summary["steps"] and {"transformer", "text"} <= set(weights)
    with tarfile.open(out / "shapes-runs.tgz") as tar:
        assert {"data.out", "tiny/log.jsonl", "tiny/sweep.json", "tiny/recipe.json"} <= set(tar.getnames())


def test_gpu_shapes_script_fails_when_no_recipe_trains(tmp_path, work):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "IMAGES": IMAGES, "AR_SECONDS": "1",
           "CONFIGS": "bad:no_such_field=1", "WORK": str(work), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_shapes.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0 and "bad has no ar.pt" in done.stdout
