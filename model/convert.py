"""Convert the official STAR release into a model directory: `python -m model.convert` / `star convert`.

Reads the transformer training snapshot (`.pth`, ['trainer']['var_wo_ddp']), VAR's VQ-VAE (`.pth`)
and the `CLIP/` folder (tokenizer/, text_encoder/); checks every key and shape against the
architecture derived from the tensors; writes config.json, transformer.safetensors (bf16 by
default), vae.safetensors (float32 by default) and CLIP/. Pickles are opened with
weights_only=True; --trust-pickle allows a file that needs more. A sampler head in the checkpoint
(`star-1024-sampler`) is kept, key for key, and config.json records it with its refinement rules.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .model_dir import parse_dtype, write_model_dir
from .text import TextEncoder
from .sampler_head import SamplerHead
from .transformer import StarTransformer
from .vqvae import VQVAE
from .weights import WeightsError, load_strict_, read_official

log = logging.getLogger(__name__)


def convert(ar_path: str | Path, vae_path: str | Path, clip_dir: str | Path, out: str | Path, *,
            dtype: str = "bf16", vae_dtype: str = "fp32", name: str | None = None, trust_pickle: bool = False,
            patch_nums: tuple[int, ...] | None = None, overrides: dict | None = None,
            use_sampler_head: bool | None = None, sampler_rules: dict | None = None) -> Path:
    """Write a model directory; raise WeightsError / FileNotFoundError on any problem.

    use_sampler_head / sampler_rules: as in weights.load_official (keep a head when there is one,
    with the release's rules unless told otherwise)."""
    out = Path(out)
    cfg, ar_sd, head_sd, vae_sd = read_official(ar_path, vae_path, name=name or out.name, trust_pickle=trust_pickle,
                                                use_sampler_head=use_sampler_head, sampler_rules=sampler_rules,
                                                patch_nums=patch_nums, overrides=overrides)
    with torch.device("meta"):  # strict check of names and shapes, without allocating
        load_strict_(StarTransformer(cfg), ar_sd, f"transformer checkpoint {ar_path}")
        if cfg.sampler_head is not None:
            load_strict_(SamplerHead(cfg), head_sd, f"transformer checkpoint {ar_path} (sampler head)")
        load_strict_(VQVAE(cfg), vae_sd, f"VQ-VAE {vae_path}")
    text = TextEncoder.from_folder(clip_dir, cfg.text_len)
    if text.model.config.hidden_size != cfg.text_dim:
        raise WeightsError(f"CLIP text encoder in {clip_dir} has width {text.model.config.hidden_size}, "
                           f"the transformer expects {cfg.text_dim}")
    source = {"ar_checkpoint": str(ar_path), "vae": str(vae_path), "clip": str(clip_dir)}
    return write_model_dir(out, cfg, {**ar_sd, **head_sd}, vae_sd, text, parse_dtype(dtype), parse_dtype(vae_dtype),
                           source)


def _patch_nums(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.replace(" ", "").split(",") if p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="star convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ar", required=True, help="official transformer checkpoint (.pth training snapshot)")
    ap.add_argument("--vae", required=True, help="VAR's VQ-VAE checkpoint, e.g. vae_ch160v4096z32.pth")
    ap.add_argument("--clip", required=True, help="CLIP folder with tokenizer/ and text_encoder/")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="transformer weights dtype (default bf16)")
    ap.add_argument("--vae-dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                    help="VQ-VAE weights dtype (default fp32)")
    ap.add_argument("--name", help="model name stored in config.json (default: the output folder's name)")
    ap.add_argument("--patch-nums", type=_patch_nums, help="scale schedule, e.g. 1,2,3,4,5,6,8,10,13,16 "
                    "(default: from the snapshot's config)")
    ap.add_argument("--no-logit-norm", action="store_true", help="the checkpoint has no LayerNorm before head_logits")
    ap.add_argument("--rope-theta", type=float, help="override RoPE theta (default 10000 or the snapshot's)")
    ap.add_argument("--rope-norm", type=float, help="override the RoPE position span (default 64 or the snapshot's)")
    ap.add_argument("--no-sampler-head", action="store_true",
                    help="leave out a sampler head the checkpoint has (the model then samples plainly only)")
    ap.add_argument("--sampler-rules", type=json.loads, default=None, metavar="JSON",
                    help='the sampler head\'s refinement rules, e.g. \'{"from_scale": 9}\' (default: the '
                    "star-1024-sampler release's; fields in docs/model.md)")
    ap.add_argument("--trust-pickle", action="store_true", help="allow .pth files that need arbitrary code to load")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in (("rope_theta", args.rope_theta), ("rope_norm", args.rope_norm)) if v is not None}
    if args.no_logit_norm:
        overrides["logit_norm"] = False
    try:
        out = convert(args.ar, args.vae, args.clip, args.out, dtype=args.dtype, vae_dtype=args.vae_dtype,
                      name=args.name, trust_pickle=args.trust_pickle, patch_nums=args.patch_nums, overrides=overrides,
                      use_sampler_head=False if args.no_sampler_head else None, sampler_rules=args.sampler_rules)
    except (WeightsError, OSError, ValueError) as e:
        print(f"star convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
