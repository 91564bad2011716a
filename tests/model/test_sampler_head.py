"""Causal-driven stable sampling (the sampler head): the official outputs, its rules, batching, loading."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import convert as convert_mod
from model import golden
from model.config import PRESETS, SamplerHeadConfig, StarConfig, refine_step_sizes
from model.pipeline import ImageRequest, StarPipeline
from model.sampler_head import SamplerHead
from model.weights import WeightsMismatchError, load_official, read_official_ar

S14 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18)   # the golden tiny-sampler case's schedule
S10 = PRESETS["tiny-sampler"].patch_nums                  # the tiny-sampler preset's: scales 7-9 refined


@pytest.fixture(scope="module")
def head_pipe():
    """tiny with a one-block head: scales 7 and 8 in 8 steps (0-4 base head), scale 9 in 15 (head only)."""
    return StarPipeline.load("tiny-sampler")


@pytest.fixture(scope="module")
def sampler_case(golden_dir):
    return golden_dir / "tiny-sampler"


def _tokens(pipe, requests, **kw):
    cond, _ = pipe.encode_prompts([r.prompt for r in requests], [r.negative_prompt for r in requests])
    return pipe.sample_tokens(cond, requests, **kw)


def test_tiny_sampler_matches_official_alone_and_in_a_batch(sampler_case):
    out = io.StringIO()
    assert golden.check_case(sampler_case, out=out), out.getvalue()
    text = out.getvalue()
    assert "A scale 13 pn 18: tokens   324/324   logits max err -  commit step 324/324 kind 324/324" in text
    assert "B sampler head logits, scale 9 step 5: max err" in text
    assert "A in batch [A, B]: tokens per scale [1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 144, 196, 256, 324]" in text


def test_step_sizes_follow_the_arccos_schedule():
    assert refine_step_sizes(100, 8) == (1, 7, 10, 13, 15, 17, 19, 18)
    assert refine_step_sizes(324, 15) == (1, 8, 12, 15, 17, 19, 21, 23, 25, 27, 28, 30, 31, 33, 34)
    assert sum(refine_step_sizes(64 * 64, 15)) == 4096 and min(refine_step_sizes(441, 8)) >= 1
    assert refine_step_sizes(9, 8)[-1] < 1          # what the configuration check refuses


def test_a_scale_too_small_for_its_steps_is_refused(sampler_case):
    with pytest.raises(ValueError, match=r"scale 3 \(4x4 = 16 positions\) in 15 steps.*last must be >= 1"):
        PRESETS["tiny"].replace(sampler_head=SamplerHeadConfig(from_scale=3, late_from_scale=3))
    with pytest.raises(ValueError, match=r"scale 2 \(3x3 = 9 positions\) in 8 steps"):
        StarConfig.from_dict({**PRESETS["tiny"].to_dict(), "sampler_head": {"from_scale": 2}})
    case = json.loads((sampler_case / "config.json").read_text())
    with pytest.raises(WeightsMismatchError, match=r"refines scale 1 \(2x2 = 4 positions\)"):
        load_official(sampler_case / case["checkpoint"], sampler_case / case["vae"], patch_nums=S14,
                      sampler_rules={**case["sampler_head"], "from_scale": 1})


def test_rules_hold_for_another_schedule(head_pipe):
    """Another version and first scale: the head in every step, 8 steps everywhere, 5 random steps."""
    rules = SamplerHeadConfig.from_dict({"blocks": 1, "from_scale": 8, "version": "512"})
    assert (rules.base_head_steps, rules.late_from_scale, rules.random_steps) == (0, None, 5)
    cfg = head_pipe.cfg.replace(sampler_head=rules)
    head = SamplerHead(cfg)
    head.load_state_dict(head_pipe.sampler_head.state_dict())
    pipe = StarPipeline("other", cfg, head_pipe.transformer, head_pipe.vae, head_pipe.text_encoder, sampler_head=head)
    commits, calls = {}, []
    _tokens(pipe, [ImageRequest("a kite", seed=4, top_k=20)], on_head_logits=lambda si, step, lg: calls.append((si, step)),
            on_commits=lambda si, images, st, kind: commits.__setitem__(si, (st[0], kind[0])))
    assert sorted(commits) == [8, 9]
    assert calls == [(si, step) for si in (8, 9) for step in range(8)]
    for si, (step_l, kind_l) in commits.items():
        sizes = refine_step_sizes(S10[si] ** 2, 8)
        assert [int((step_l == s).sum()) for s in range(8)] == list(sizes)      # exactly k per step
        assert torch.equal(kind_l, (step_l < 5).long())                         # random, then by confidence


def _check_release_rules(commits: dict, calls: list) -> None:
    """Commit counts and kinds of the preset's rules (the release's, late rules from scale 9)."""
    assert sorted(commits) == [7, 8, 9]
    assert calls == [(si, s) for si in (7, 8) for s in (5, 6, 7)] + [(9, s) for s in range(15)]
    for si, (step_l, kind_l) in commits.items():
        sizes = refine_step_sizes(S10[si] ** 2, 15 if si == 9 else 8)
        assert int(step_l.min()) == 0 and int(step_l.max()) < len(sizes)       # every position, once
        by_step = [int((step_l == s).sum()) for s in range(len(sizes))]
        random_by_step = [int(((step_l == s) & (kind_l == 1)).sum()) for s in range(len(sizes))]
        assert random_by_step[:5] == list(sizes[:5]) and sum(random_by_step[5:]) == 0
        if si < 9:    # base-head steps also commit up to k by confidence
            assert all(sizes[s] <= by_step[s] <= 2 * sizes[s] for s in range(5))
        else:
            assert by_step == list(sizes)


def test_head_images_follow_the_rules_are_reproducible_and_batch_invariant_among_plain_ones(head_pipe):
    target = ImageRequest("a cat on a sofa", seed=1234, cfg=3.0, top_k=40, top_p=0.9, temperature=1.2, sampler="head")
    plain = ImageRequest("a dog", seed=1, cfg=1.0, top_k=40, top_p=0.0, sampler="plain")
    other_head = ImageRequest("mountains", seed=2, negative_prompt="blurry", top_k=5, top_p=0.5)   # auto = head
    commits, calls = {}, []
    alone = _tokens(head_pipe, [target], on_head_logits=lambda si, step, lg: calls.append((si, step)),
                    on_commits=lambda si, images, st, kind: commits.__setitem__(si, (st[0], kind[0])))
    _check_release_rules(commits, calls)
    plain_alone = _tokens(head_pipe, [plain])
    batch = _tokens(head_pipe, [plain, target, other_head])       # another run: also reproducibility
    for si in range(len(S10)):
        assert torch.equal(batch.idx_per_scale[si][1], alone.idx_per_scale[si][0]), si
        assert torch.equal(batch.idx_per_scale[si][0], plain_alone.idx_per_scale[si][0]), si
    assert torch.equal(batch.f_hat_NChw[1], alone.f_hat_NChw[0])
    assert not torch.equal(batch.idx_per_scale[-1][1], batch.idx_per_scale[-1][2])
    other_seed = _tokens(head_pipe, [dataclasses.replace(target, seed=1235)])
    assert not torch.equal(other_seed.idx_per_scale[-1], alone.idx_per_scale[-1])
    as_plain = _tokens(head_pipe, [dataclasses.replace(target, sampler="plain")])
    same = [torch.equal(as_plain.idx_per_scale[si][0], alone.idx_per_scale[si][0]) for si in range(len(S10))]
    assert same == [True] * 7 + [False] * 3       # the head changes the refined scales only


def test_cancel_between_refined_scales(head_pipe):
    reqs = [ImageRequest("one", seed=1), ImageRequest("two", seed=2, sampler="plain")]
    calls = []

    def on_scale(k, S):
        calls.append(k)
        return [0] if k == 9 else None           # after refined scales 7 and 8

    results = head_pipe.generate(reqs, on_scale=on_scale)
    assert calls == list(range(1, 11)) and results[0].canceled and results[0].image is None
    assert np.array_equal(results[1].image, head_pipe.generate(reqs[1:])[0].image)
    stopped = []
    results = head_pipe.generate(reqs[:1], on_scale=lambda k, S: stopped.append(k) or ([0] if k == 8 else None))
    assert stopped == list(range(1, 9)) and results[0].canceled


def test_sampler_choice_is_validated(head_pipe, tiny_pipe):
    assert head_pipe.has_sampler_head and not tiny_pipe.has_sampler_head
    assert head_pipe.with_defaults(ImageRequest("x", 1)).sampler == "head"
    assert head_pipe.with_defaults(ImageRequest("x", 1, sampler="plain")).sampler == "plain"
    assert tiny_pipe.with_defaults(ImageRequest("x", 1, sampler="auto")).sampler == "plain"
    with pytest.raises(ValueError, match="sampler 'head' needs a model with a sampler head; 'tiny' has none"):
        tiny_pipe.generate([ImageRequest("x", 1, sampler="head")])
    with pytest.raises(ValueError, match="sampler must be one of auto, head, plain, got 'fancy'"):
        head_pipe.generate([ImageRequest("x", 1, sampler="fancy")])


def test_conversion_keeps_the_head(sampler_case, clip_dir, tmp_path):
    case = json.loads((sampler_case / "config.json").read_text())
    ar, vae = sampler_case / case["checkpoint"], sampler_case / case["vae"]
    out = tmp_path / "tiny-sampler"
    assert convert_mod.main(["--ar", str(ar), "--vae", str(vae), "--clip", str(clip_dir), "--out", str(out),
                             "--dtype", "fp32", "--sampler-rules", '{"from_scale": 10}']) == 0
    arch = json.loads((out / "config.json").read_text())["arch"]
    assert arch["sampler_head"] == {**SamplerHeadConfig().to_dict(), "from_scale": 10}
    pipe = StarPipeline.load(str(out))
    assert pipe.has_sampler_head and pipe.cfg.sampler_head.from_scale == 10
    ar_sd, _ = read_official_ar(ar)
    for k, v in {**pipe.transformer.state_dict(), **pipe.sampler_head.state_dict()}.items():
        assert torch.equal(v, ar_sd.pop(k)), k
    assert ar_sd == {}                       # every key of the checkpoint made it
    commits = {}
    _tokens(pipe, [ImageRequest("x", seed=1)], on_commits=lambda si, *a: commits.setdefault(si, True))
    assert sorted(commits) == [10, 11, 12, 13]
    plain = tmp_path / "plain"
    assert convert_mod.main(["--ar", str(ar), "--vae", str(vae), "--clip", str(clip_dir), "--out", str(plain),
                             "--no-sampler-head"]) == 0
    assert "sampler_head" not in json.loads((plain / "config.json").read_text())["arch"]
    assert not StarPipeline.load(str(plain)).has_sampler_head


def test_missing_unexpected_and_misshapen_head_keys_are_named(sampler_case, clip_dir, tmp_path, capsys):
    case = json.loads((sampler_case / "config.json").read_text())
    snapshot = torch.load(sampler_case / case["checkpoint"], weights_only=True)
    sd = snapshot["trainer"]["var_wo_ddp"]
    del sd["head_proj.bias"]
    sd["feat_extract_blocks.1.attn.extra"] = torch.zeros(2)
    sd["lvl_embed_2.weight"] = torch.zeros(13, 192)
    torch.save(snapshot, tmp_path / "bad.pth")
    assert convert_mod.main(["--ar", str(tmp_path / "bad.pth"), "--vae", str(sampler_case / case["vae"]),
                             "--clip", str(clip_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "(sampler head) does not match the model" in err and "missing keys (1): head_proj.bias" in err
    assert "unexpected keys (1): feat_extract_blocks.1.attn.extra" in err
    assert "lvl_embed_2.weight: checkpoint (13, 192) vs model (14, 192)" in err


def test_model_directory_head_keys_must_match_its_config(head_pipe, tmp_path):
    from model.model_dir import write_model_dir

    sd = {**head_pipe.transformer.state_dict(), **head_pipe.sampler_head.state_dict()}
    write_model_dir(tmp_path / "m", head_pipe.cfg, sd, head_pipe.vae.state_dict(), head_pipe.text_encoder,
                    transformer_dtype=torch.float32)
    assert StarPipeline.load(str(tmp_path / "m")).has_sampler_head
    weights = load_file(tmp_path / "m" / "transformer.safetensors")
    del weights["feat_extract_blocks.0.ffn.fc1.weight"]
    save_file(weights, tmp_path / "m" / "transformer.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"missing keys \(1\): feat_extract_blocks.0.ffn.fc1.weight"):
        StarPipeline.load(str(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["arch"]["sampler_head"]                  # a directory without a head, but head weights
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(\d+\): encoder_proj2.bias"):
        StarPipeline.load(str(tmp_path / "m"))


def test_half_precision_head_keeps_float32_logits():
    pipe = StarPipeline.load("tiny-sampler", dtype=torch.bfloat16)
    assert pipe.sampler_head.head_proj.weight.dtype == torch.bfloat16
    assert pipe.sampler_head.head_logits2.weight.dtype == torch.float32
    seen = set()
    out = _tokens(pipe, [ImageRequest("a tree", seed=3)], on_head_logits=lambda si, step, lg: seen.add(lg.dtype))
    assert seen == {torch.float32} and out.idx_per_scale[-1].shape == (1, 16 * 16)
