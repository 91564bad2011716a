"""The sampler-head stage of `python -m training.train` (training/train_head.py), on the smoke recipe:
a few steps, no timing; the base model stays frozen and the written directory samples with the head."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.config import SamplerHeadConfig, get_preset
from model.model_dir import read_config
from model.pipeline import ImageRequest, StarPipeline
from model.random_init import random_sampler_head, random_transformer
from model.transformer import SAMPLER_HEAD_PREFIXES
from training.train import RECIPES, main

HEAD_STEPS = 30
SMOKE_RULES = dict(RECIPES["smoke"].head_rules)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base model dir, model dir with a head, the head stage's work dir)."""
    root = tmp_path_factory.mktemp("head")
    base, out, work = root / "base", root / "with-head", root / "work"
    assert main(["--recipe", "smoke", "--work", str(root / "base-work"), "--export", str(base), "--no-progress"]) == 0
    assert main(["--recipe", "smoke", "--work", str(work), "--from-model", str(base), "--stages", "latents,quant,head",
                 "--export", str(out), "--no-progress", "--set", f"head_steps={HEAD_STEPS}", "--set", "head_lr=3e-3"]) == 0
    return base, out, work


def test_head_stage_trains_only_the_head_and_its_hidden_token_loss_falls(trained):
    base, out, work = trained
    before, after = load_file(base / "transformer.safetensors"), load_file(out / "transformer.safetensors")
    head_keys = {k for k in after if k.startswith(SAMPLER_HEAD_PREFIXES)}
    assert head_keys and not any(k.startswith(SAMPLER_HEAD_PREFIXES) for k in before)
    assert set(after) - head_keys == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)          # the base model is untouched
    vae_before, vae_after = load_file(base / "vae.safetensors"), load_file(out / "vae.safetensors")
    assert all(torch.equal(vae_after[k], vae_before[k]) for k in vae_before)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["stage"] == "head" and "step" in r]
    assert [r["step"] for r in steps] == list(range(HEAD_STEPS))
    (summary,) = [r for r in log if r["stage"] == "head" and "eval_loss_end" in r]
    # the same images and masks before and after: a fixed seed, a fixed number of steps
    assert summary["eval_loss_end"] < summary["eval_loss_start"] - 0.05, summary
    config = read_config(out)
    assert SamplerHeadConfig.from_dict(config["arch"]["sampler_head"]) == SamplerHeadConfig.from_dict(SMOKE_RULES)
    assert config["sampling"] == read_config(base)["sampling"]
    assert config["source"]["sampler_head"]["steps"] == HEAD_STEPS


def test_written_model_samples_with_the_head_and_plainly_as_its_base(trained):
    base, out, _ = trained
    pipe, plain = StarPipeline.load(str(out)), StarPipeline.load(str(base))
    assert pipe.has_sampler_head and not plain.has_sampler_head
    request = ImageRequest("a red circle on a blue background", seed=3)
    with_head = pipe.generate([request])[0].image
    assert with_head.shape == (128, 128, 3)
    same = pipe.generate([ImageRequest(request.prompt, seed=3, sampler="plain")])[0].image
    assert (same == plain.generate([request])[0].image).all()     # the head changes nothing else
    assert (pipe.generate([ImageRequest(request.prompt, seed=3, sampler="head")])[0].image == with_head).all()


def test_head_stage_needs_a_base_model_without_a_head(trained, tmp_path):
    _, out, _ = trained
    with pytest.raises(SystemExit, match="--from-model"):
        main(["--recipe", "smoke", "--work", str(tmp_path / "a"), "--stages", "head", "--no-progress"])
    with pytest.raises(SystemExit, match="already has a sampler head"):
        main(["--recipe", "smoke", "--work", str(tmp_path / "b"), "--from-model", str(out), "--stages",
              "latents,quant,head", "--no-progress"])


def test_training_logits_per_row_are_the_sampling_logits():
    """logits_per_row (one image per row, differentiable RoPE) computes what refinement calls."""
    cfg = get_preset("tiny-sampler")
    head, base = random_sampler_head(cfg, 3), random_transformer(cfg, 0)
    g = torch.Generator().manual_seed(0)
    si, (b, e) = 8, cfg.begin_ends[8]
    N, l = 2, e - b
    e_NlCv = torch.randn(N, l, cfg.vae_channels, generator=g) * (torch.rand(N, l, 1, generator=g) < 0.5)
    text_B1C = head.text_rows(torch.randn(2 * N, cfg.text_dim, generator=g))
    h_BlC = torch.randn(2 * N, l, cfg.embed_dim, generator=g)
    rope = torch.cat((base.rope_freqs(0, 1), base.rope_freqs(b, e)))
    (c0, s0), (c, s) = base.rope(0, 1), base.rope(b, e)
    expected = head.logits(e_NlCv, si, text_B1C, h_BlC, rope)
    got = head.logits_per_row(torch.cat((e_NlCv, e_NlCv)), si, text_B1C, h_BlC, (torch.cat((c0, c)), torch.cat((s0, s))))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_adherence_scores_with_or_without_the_head(trained, capsys):
    from training.adherence import main as adherence

    base, out, _ = trained
    assert adherence([str(out), "--prompts", "1", "--seeds", "0", "--sampler", "plain"]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == "plain"
    assert adherence([str(out), "--prompts", "1", "--seeds", "0"]) == 0        # auto: the head
    assert json.loads(capsys.readouterr().out)["sampler"] == "head"
    assert adherence([str(base), "--prompts", "1", "--seeds", "0", "--sampler", "head"]) == 2
    assert "needs a model with a sampler head" in capsys.readouterr().err
