"""Fixtures of the model tests: the golden data of the official code and a shared tiny pipeline."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Golden outputs of the official STAR code: $STAR_GOLDEN_DIR or <repo>/../shared/golden/star-official."""
    path = Path(os.environ.get("STAR_GOLDEN_DIR", REPO.parent / "shared" / "golden" / "star-official"))
    if not (path / "tiny256" / "expected.safetensors").is_file():
        pytest.fail(f"golden data not found at {path}: set STAR_GOLDEN_DIR to the star-official folder "
                    "(it holds tiny256/, tiny1024/ and vae_tiny.pth)")
    return path


@pytest.fixture(scope="session")
def tiny_pipe():
    from model.pipeline import StarPipeline

    return StarPipeline.load("tiny")


@pytest.fixture(scope="session")
def golden256(golden_dir):
    """(cfg, transformer, vae, expected tensors) of the tiny256 case, float32 on CPU."""
    from safetensors.torch import load_file

    from model.weights import load_official

    cfg, tr, vae = load_official(golden_dir / "tiny256" / "tiny256-ar-ckpt.pth", golden_dir / "vae_tiny.pth")
    return cfg, tr, vae, load_file(golden_dir / "tiny256" / "expected.safetensors")
