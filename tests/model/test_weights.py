"""Loading official checkpoints and model directories: strict keys, clear errors, the converter."""
from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model import convert as convert_mod
from model.config import PRESETS
from model.pipeline import ImageRequest, StarPipeline
from model.weights import (ModelFileNotFoundError, UntrustedPickleError, WeightsMismatchError, build_transformer,
                           build_vae, load_official, read_official_ar, read_official_vae)


@pytest.fixture(scope="module")
def official_paths(golden_dir):
    return golden_dir / "tiny256" / "tiny256-ar-ckpt.pth", golden_dir / "vae_tiny.pth"


def _save_snapshot(path, sd, config):
    torch.save({"epoch": 0, "iter": 0, "trainer": {"config": config, "var_wo_ddp": sd}}, path)


def test_architecture_is_derived_from_the_shapes(official_paths):
    cfg, tr, vae, head = load_official(*official_paths)
    assert head is None and cfg.sampler_head is None
    tiny = PRESETS["tiny"]
    shape = (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.vocab_size, cfg.vae_channels, cfg.text_dim)
    assert shape == (2, 128, 2, 64, 8, 48)
    assert (cfg.vae_ch, cfg.vae_ch_mult, cfg.patch_nums) == (32, (1, 1, 2, 2, 4), tiny.patch_nums)
    assert cfg.replace(name="tiny") == tiny  # the tiny preset is the golden tiny256 architecture


def test_converter_round_trips_the_weights(official_paths, clip_dir, tmp_path):
    ar_path, vae_path = official_paths
    out = tmp_path / "tiny256-bf16"
    assert convert_mod.main(["--ar", str(ar_path), "--vae", str(vae_path), "--clip", str(clip_dir),
                             "--out", str(out), "--dtype", "bf16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["transformer_dtype"], config["vae_dtype"]) == ("star-model", "bfloat16", "float32")
    with safe_open(out / "transformer.safetensors", "pt") as f:
        assert f.get_tensor("blocks.0.attn.mat_qkv.weight").dtype == torch.bfloat16
    ar_sd, _ = read_official_ar(ar_path)
    vae_sd = read_official_vae(vae_path)
    pipe = StarPipeline.load(str(out), dtype="float32")
    assert pipe.name == "tiny256-bf16" and pipe.cfg.patch_nums == PRESETS["tiny"].patch_nums
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, ar_sd[k].to(torch.bfloat16).float()), k
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, vae_sd[k]), k
    result = pipe.generate([ImageRequest("a tiny test", seed=0)])[0]
    assert result.image.shape == (256, 256, 3) and result.image.dtype == np.uint8


def test_fp32_model_directory_reproduces_golden_tokens(official_paths, clip_dir, tmp_path, golden256):
    ar_path, vae_path = official_paths
    convert_mod.convert(ar_path, vae_path, clip_dir, tmp_path / "m", dtype="fp32")
    pipe = StarPipeline.load(str(tmp_path / "m"))
    _, _, _, exp = golden256
    from model.autoregress import Conditioning

    cond = Conditioning(exp["text.hidden"][:1], exp["text.mask"][:1], exp["text.pooled"][:1], exp["text.pooled"][2:])
    out = pipe.sample_tokens(cond, [ImageRequest("", seed=0, cfg=4.0, top_k=1, top_p=0.0)])
    for si, idx in enumerate(out.idx_per_scale):
        assert torch.equal(idx[0], exp[f"A.idx.{si}"]), si


def test_wrong_shapes_are_named(official_paths):
    ar_sd, _ = read_official_ar(official_paths[0])
    with pytest.raises(WeightsMismatchError) as e:
        build_transformer(PRESETS["tiny"].replace(vocab_size=32), ar_sd, "tiny256")
    assert "head_logits.weight: checkpoint (64, 128) vs model (32, 128)" in str(e.value)
    with pytest.raises(WeightsMismatchError, match="lvl_embed.weight: checkpoint \\(10, 128\\) vs model \\(14, 128\\)"):
        build_transformer(PRESETS["tiny"].replace(patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)), ar_sd)


def test_missing_and_unexpected_keys_are_named(official_paths):
    ar_sd, _ = read_official_ar(official_paths[0])
    del ar_sd["blocks.1.ffn.fc2.bias"]
    ar_sd["blocks.0.attn.extra"] = torch.zeros(3)
    with pytest.raises(WeightsMismatchError) as e:
        build_transformer(PRESETS["tiny"], ar_sd)
    assert "missing keys (1): blocks.1.ffn.fc2.bias" in str(e.value)
    assert "unexpected keys (1): blocks.0.attn.extra" in str(e.value)


def test_missing_files_are_clear_errors(tmp_path, official_paths, clip_dir, capsys):
    with pytest.raises(ModelFileNotFoundError, match="transformer checkpoint not found: .*nope.pth"):
        read_official_ar(tmp_path / "nope.pth")
    assert isinstance(ModelFileNotFoundError("x"), FileNotFoundError)
    rc = convert_mod.main(["--ar", str(official_paths[0]), "--vae", str(tmp_path / "vae.pth"),
                           "--clip", str(clip_dir), "--out", str(tmp_path / "out")])
    assert rc == 2 and "VQ-VAE checkpoint not found" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({"format": "star-model", "format_version": 1,
                                                              "arch": PRESETS["tiny"].to_dict()}))
    with pytest.raises(ModelFileNotFoundError, match="lacks transformer.safetensors"):
        StarPipeline.load(str(tmp_path / "half"))


def test_untrusted_pickle_is_refused_unless_trusted(official_paths, tmp_path):
    ar_sd, _ = read_official_ar(official_paths[0])
    path = tmp_path / "snapshot-with-namespace.pth"
    _save_snapshot(path, ar_sd, argparse.Namespace(patch_nums=list(PRESETS["tiny"].patch_nums)))
    with pytest.raises(UntrustedPickleError, match="needs arbitrary code.*trust_pickle=True.*--trust-pickle"):
        load_official(path, official_paths[1])
    cfg = load_official(path, official_paths[1], trust_pickle=True).cfg
    assert cfg.patch_nums == PRESETS["tiny"].patch_nums


def test_an_incomplete_sampler_head_is_named_and_can_be_left_out(official_paths, tmp_path, caplog):
    ar_sd, _ = read_official_ar(official_paths[0])
    ar_sd["head_logits2.weight"] = torch.zeros(64, 128)
    ar_sd["feat_extract_blocks.0.attn.mat_qkv.weight"] = torch.zeros(384, 128)
    path = tmp_path / "with-sampler.pth"
    _save_snapshot(path, ar_sd, {"patch_nums": list(PRESETS["tiny"].patch_nums)})
    with pytest.raises(WeightsMismatchError) as e:
        load_official(path, official_paths[1])
    assert "(sampler head) does not match the model" in str(e.value)
    assert "head_logits2.bias" in str(e.value) and "feat_extract_blocks.0.ffn.fc2.weight" in str(e.value)
    with caplog.at_level(logging.INFO, logger="model.weights"):
        m = load_official(path, official_paths[1], use_sampler_head=False)
    assert m.sampler_head is None and m.cfg.sampler_head is None
    assert "leaving out the 2 keys of the optional sampler head" in caplog.text
    with pytest.raises(WeightsMismatchError, match="has no sampler head"):
        load_official(official_paths[0], official_paths[1], use_sampler_head=True)


def test_vae_with_another_scale_count_loads(official_paths):
    vae_sd = read_official_vae(official_paths[1])
    assert vae_sd["quantize.ema_vocab_hit_SV"].shape[0] == 10
    cfg14 = PRESETS["tiny"].replace(patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))
    vae = build_vae(cfg14, vae_sd)
    assert torch.equal(vae.quantize.embedding.weight, vae_sd["quantize.embedding.weight"])


def test_safetensors_are_memory_mapped_without_copies(tmp_path):
    from safetensors.torch import save_file

    from model.model_dir import mmap_safetensors

    sd = {"i": torch.arange(5), "f": torch.randn(2, 3), "b": torch.randn(7).to(torch.bfloat16),
          "h": torch.randn(1, 4).half(), "e": torch.zeros(0)}
    save_file(sd, tmp_path / "w.safetensors")
    loaded = mmap_safetensors(tmp_path / "w.safetensors")
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert loaded[k].dtype == sd[k].dtype and torch.equal(loaded[k], sd[k]), k
    # every tensor is a view of the same mapped storage
    assert len({t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}) == 1
