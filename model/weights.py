"""Weight loading: official `.pth` files, model directories, strict keys, no untrusted pickles.

Official files are pickles. They are opened with `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers; a file that needs more (arbitrary classes, i.e. code) is
refused with `UntrustedPickleError` unless the caller passes `trust_pickle=True`. Keys are matched
strictly: missing, unexpected and wrongly shaped keys are named in `WeightsMismatchError`.

The optional sampler head (`star-1024-sampler`) is recognised by its keys (SAMPLER_HEAD_PREFIXES,
official names at the top level of the state dict), kept, and built as its own module.
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .config import PATCH_NUMS_256, SamplerHeadConfig, StarConfig
from .sampler_head import SamplerHead
from .transformer import SAMPLER_HEAD_PREFIXES, StarTransformer
from .vqvae import VQVAE

log = logging.getLogger(__name__)


class WeightsError(Exception):
    """Base class of every weight-loading error of this package."""


class ModelFileNotFoundError(WeightsError, FileNotFoundError):
    pass


class UntrustedPickleError(WeightsError):
    pass


class WeightsMismatchError(WeightsError, ValueError):
    pass


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"{what} not found: {path} (no such file)")
    return path


def torch_load(path: str | Path, what: str, trust_pickle: bool = False):
    """torch.load on CPU with weights_only=True (mmap when the format allows it)."""
    path = require_file(path, what)
    if trust_pickle:
        log.warning("loading %s with weights_only=False: %s can run code; trusted by the operator", what, path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UntrustedPickleError(
            f"{what} {path} needs arbitrary code to load (it pickles more than tensors and plain "
            f"containers), so it was refused. If you trust this file, allow it with trust_pickle=True "
            f"(command line: --trust-pickle). Detail: {str(e).splitlines()[0]}") from None


def _config_value(config, key: str, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def read_official_ar(path: str | Path, trust_pickle: bool = False) -> tuple[dict, dict]:
    """(state_dict, run config) from an official training snapshot ['trainer']['var_wo_ddp'].

    A bare state dict is accepted too (its run config is then empty).
    """
    obj = torch_load(path, "transformer checkpoint", trust_pickle)
    if not isinstance(obj, dict):
        raise WeightsMismatchError(f"transformer checkpoint {path} holds a {type(obj).__name__}, not a dict")
    if "trainer" in obj:
        trainer = obj["trainer"]
        if "var_wo_ddp" not in trainer:
            raise WeightsMismatchError(f"{path}: ['trainer'] has no 'var_wo_ddp' (keys: {sorted(trainer)})")
        run_config = trainer.get("config", {}) or {}
        keys = ("patch_nums", "rope_theta", "rope_norm", "enable_logit_norm")
        meta = {k: _config_value(run_config, k) for k in keys if _config_value(run_config, k) is not None}
        return dict(trainer["var_wo_ddp"]), meta
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), {}
    raise WeightsMismatchError(f"{path} is neither a training snapshot (['trainer']['var_wo_ddp']) nor a state dict")


def read_official_vae(path: str | Path, trust_pickle: bool = False) -> dict:
    obj = torch_load(path, "VQ-VAE checkpoint", trust_pickle)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"VQ-VAE checkpoint {path} is not a state dict of tensors")
    return dict(obj)


def split_sampler_head(sd: dict) -> tuple[dict, dict]:
    """(the base model's keys, the optional sampler head's keys) of a state dict."""
    head = {k: v for k, v in sd.items() if k.startswith(SAMPLER_HEAD_PREFIXES)}
    return {k: v for k, v in sd.items() if k not in head}, head


def choose_sampler_head(head_sd: dict, use_sampler_head: bool | None, source: str) -> dict:
    """The head's keys to keep: all of them (None: when there are any; True: they must exist) or,
    with False, none (plain sampling only; the dropped keys are logged)."""
    if use_sampler_head and not head_sd:
        raise WeightsMismatchError(f"{source} has no sampler head (no keys {', '.join(SAMPLER_HEAD_PREFIXES)}): "
                                   "load it without use_sampler_head=True; it samples plainly")
    if use_sampler_head is False and head_sd:
        log.info("%s: leaving out the %d keys of the optional sampler head, e.g. %s", source, len(head_sd),
                 next(iter(head_sd)))
        return {}
    return head_sd


def sampler_head_config(head_sd: dict, rules: SamplerHeadConfig | dict | None = None) -> SamplerHeadConfig | None:
    """The head's config from its keys (block count) and the refinement rules (default: the
    release's); None without head keys."""
    if not head_sd:
        if rules:
            raise WeightsMismatchError("sampler head rules were given, but the checkpoint's sampler head is not "
                                       "loaded (it has none, or it was left out)")
        return None
    blocks = len({m.group(1) for k in head_sd if (m := re.match(r"feat_extract_blocks\.(\d+)\.", k))})
    if isinstance(rules, dict):
        try:
            rules = SamplerHeadConfig.from_dict({"blocks": blocks, **rules})
        except (TypeError, ValueError) as e:
            raise WeightsMismatchError(f"sampler head rules {rules}: {e}") from None
    rules = rules or SamplerHeadConfig(blocks=blocks)
    if rules.blocks != blocks:
        raise WeightsMismatchError(f"sampler head rules say {rules.blocks} blocks, the checkpoint has {blocks} "
                                   "(feat_extract_blocks.*)")
    return rules


def _block_indices(sd: dict) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def _vae_arch(vae_sd: dict) -> dict:
    if "quantize.embedding.weight" not in vae_sd or "encoder.conv_in.weight" not in vae_sd:
        raise WeightsMismatchError("VQ-VAE state dict lacks quantize.embedding.weight / encoder.conv_in.weight")
    ch = vae_sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in vae_sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = [vae_sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    V, Cv = vae_sd["quantize.embedding.weight"].shape
    return dict(vocab_size=V, vae_channels=Cv, vae_ch=ch, vae_ch_mult=tuple(mult))


def config_from_official(name: str, ar_sd: dict, vae_sd: dict, meta: dict,
                         patch_nums: tuple[int, ...] | None = None,
                         sampler_head: SamplerHeadConfig | None = None) -> StarConfig:
    """Architecture derived from tensor shapes (depth, width, heads, V, Cvae, text width, scales);
    ar_sd holds the base model's keys (see split_sampler_head)."""
    try:
        C, Cv = ar_sd["word_embed.weight"].shape
        depth, S = len(_block_indices(ar_sd)), ar_sd["lvl_embed.weight"].shape[0]
        heads = ar_sd["blocks.0.attn.scale_mul_1H11"].shape[1]
        text_dim = ar_sd["encoder_proj.weight"].shape[1]
        num_classes = ar_sd["class_emb.weight"].shape[0] - 1
    except KeyError as e:
        raise WeightsMismatchError(f"transformer state dict lacks {e.args[0]!r}: not a STAR checkpoint?") from None
    patch_nums = tuple(patch_nums or meta.get("patch_nums") or ())
    if not patch_nums:
        if S != len(PATCH_NUMS_256):
            raise WeightsMismatchError(f"the checkpoint has {S} scales but no patch_nums; pass them explicitly")
        patch_nums = PATCH_NUMS_256
    if len(patch_nums) != S:
        raise WeightsMismatchError(f"patch_nums {patch_nums} has {len(patch_nums)} scales, lvl_embed has {S} rows")
    try:
        cfg = StarConfig(name=name, depth=depth, patch_nums=patch_nums, text_dim=text_dim, num_classes=num_classes,
                         embed_dim=C, num_heads=heads, head_dim=C // heads,
                         rope_theta=float(meta.get("rope_theta", 10000.0)), rope_norm=float(meta.get("rope_norm", 64.0)),
                         logit_norm=bool(meta.get("enable_logit_norm", True)), sampler_head=sampler_head,
                         **_vae_arch(vae_sd))
    except ValueError as e:   # e.g. a sampler head whose rules refine a scale too small for them
        raise WeightsMismatchError(f"{name}: {e}") from None
    if cfg.vae_channels != Cv:
        raise WeightsMismatchError(f"word_embed expects Cvae {Cv}, the VQ-VAE has {cfg.vae_channels}")
    return cfg


def load_strict_(module: nn.Module, sd: dict, what: str) -> nn.Module:
    """Load with assign=True after checking names and shapes; every problem is listed by key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{what} does not match the model"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise WeightsMismatchError("; ".join(parts))
    module.load_state_dict(sd, strict=True, assign=True)
    return module


def fit_vae_state(vae_sd: dict, num_scales: int) -> dict:
    """The official loader's rule: an ema_vocab_hit_SV with another scale count is replaced (unused)."""
    key = "quantize.ema_vocab_hit_SV"
    if key in vae_sd and vae_sd[key].shape[0] != num_scales:
        vae_sd = dict(vae_sd)
        vae_sd[key] = torch.zeros(num_scales, vae_sd[key].shape[1], dtype=vae_sd[key].dtype)
    return vae_sd


def build_transformer(cfg: StarConfig, sd: dict, what: str = "transformer weights") -> StarTransformer:
    with torch.device("meta"):
        model = StarTransformer(cfg)
    load_strict_(model, sd, what)
    model.reset_buffers_("cpu")
    return model.eval().requires_grad_(False)


def build_sampler_head(cfg: StarConfig, sd: dict, what: str = "sampler head weights") -> SamplerHead:
    with torch.device("meta"):
        head = SamplerHead(cfg)
    load_strict_(head, sd, f"{what} (sampler head)")
    return head.eval().requires_grad_(False)


def build_transformer_and_head(cfg: StarConfig, sd: dict, what: str = "transformer weights"
                               ) -> tuple[StarTransformer, SamplerHead | None]:
    """The transformer, and the sampler head when cfg has one, from one state dict with strict keys
    (without a head in cfg, head keys in sd are unexpected keys)."""
    if cfg.sampler_head is None:
        return build_transformer(cfg, sd, what), None
    base_sd, head_sd = split_sampler_head(sd)
    return build_transformer(cfg, base_sd, what), build_sampler_head(cfg, head_sd, what)


def build_vae(cfg: StarConfig, sd: dict, what: str = "VQ-VAE weights") -> VQVAE:
    with torch.device("meta"):
        vae = VQVAE(cfg)
    load_strict_(vae, fit_vae_state(sd, cfg.num_scales), what)
    return vae.eval().requires_grad_(False)


class OfficialModel(NamedTuple):
    cfg: StarConfig
    transformer: StarTransformer
    vae: VQVAE
    sampler_head: SamplerHead | None


def read_official(ar_path: str | Path, vae_path: str | Path, *, name: str, trust_pickle: bool = False,
                  use_sampler_head: bool | None = None, sampler_rules: SamplerHeadConfig | dict | None = None,
                  patch_nums: tuple[int, ...] | None = None, overrides: dict | None = None
                  ) -> tuple[StarConfig, dict, dict, dict]:
    """(config, base state dict, sampler-head state dict ({} without a head), VQ-VAE state dict).
    overrides: config fields the shapes cannot tell (rope_theta, rope_norm, logit_norm)."""
    ar_sd, meta = read_official_ar(ar_path, trust_pickle)
    ar_sd, head_sd = split_sampler_head(ar_sd)
    head_sd = choose_sampler_head(head_sd, use_sampler_head, str(ar_path))
    vae_sd = read_official_vae(vae_path, trust_pickle)
    cfg = config_from_official(name, ar_sd, vae_sd, meta, patch_nums, sampler_head_config(head_sd, sampler_rules))
    if overrides:
        cfg = cfg.replace(**overrides)
    return cfg, ar_sd, head_sd, fit_vae_state(vae_sd, cfg.num_scales)


def load_official(ar_path: str | Path, vae_path: str | Path, *, name: str | None = None,
                  trust_pickle: bool = False, use_sampler_head: bool | None = None,
                  sampler_rules: SamplerHeadConfig | dict | None = None,
                  patch_nums: tuple[int, ...] | None = None, overrides: dict | None = None) -> OfficialModel:
    """Config + transformer + VQ-VAE + sampler head (None without one) from the official `.pth`
    files (float32, CPU). use_sampler_head: None keeps a head when the checkpoint has one, True
    requires it, False leaves it out. sampler_rules: the head's refinement rules (default: the
    release's), as SamplerHeadConfig or a config.json "sampler_head" block. overrides: see
    read_official."""
    cfg, ar_sd, head_sd, vae_sd = read_official(ar_path, vae_path, name=name or Path(ar_path).stem,
                                                trust_pickle=trust_pickle, use_sampler_head=use_sampler_head,
                                                sampler_rules=sampler_rules, patch_nums=patch_nums,
                                                overrides=overrides)
    what = f"transformer checkpoint {ar_path}"
    head = build_sampler_head(cfg, head_sd, what) if cfg.sampler_head is not None else None
    return OfficialModel(cfg, build_transformer(cfg, ar_sd, what), build_vae(cfg, vae_sd, f"VQ-VAE {vae_path}"), head)
