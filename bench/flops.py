"""FLOPs of one generation, counted from the shapes (matmuls only: 2*m*n*k per product).

What is counted, per image, guidance (CFG) included:
  transformer, every scale si (l = pn*pn new tokens attending to the e = end of scale si prefix):
    self-attention  QKV 2*B*l*C*3C, scores + AV 4*B*l*e*C, output projection 2*B*l*C*C
    cross-attention q and projection 2*N*l*C*C each (conditional rows only, as the model runs it),
                    scores + AV against all T text tokens 4*N*l*T*C
    FFN             2 * 2*B*l*C*hidden
    head            2*B*l*C*V
    word_embed      2*N*l*Cvae*C for si > 0 (computed once, shared by both rows)
  once per request: text K/V of every layer 2*N*T*D*2C*depth, start token 2*B*D*C
  text encoder (CLIP), per distinct text: per layer 2*T*D*3D (QKV) + 2*T*D*D (out)
    + 2*2*T*D*I (MLP) + 4*T*T*D (scores + AV)
  sampler head (images that use it), every head step of a refined scale (r = 1 + l rows: the
  text row and the scale's positions):
    word_embed_head 2*N*l*Cvae*C, head_proj 2*B*r*2C*C, per block QKV + projection 2*B*r*C*4C,
    scores + AV 4*B*r*r*C, FFN 2 * 2*B*r*C*hidden; head_logits2 2*B*l*C*V;
    once per request: its text rows 2*B*D*C
with B = 2N rows (conditional + unconditional) and N images; with fast guidance
(guidance_stop), B = N on the scales from the stop scale on (the sampler head's too). Elementwise work (norms, RoPE,
softmax, sampling, VQ feature maps) is not counted. The same 2*m*n*k rule gives the FLOP/s of
the reference matmul, so the two are comparable.
"""
from __future__ import annotations

from dataclasses import dataclass


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


@dataclass(frozen=True)
class TextEncoderShape:
    layers: int
    hidden: int
    intermediate: int
    tokens: int = 77

    @classmethod
    def of(cls, hf_config, tokens: int = 77) -> "TextEncoderShape":
        return cls(hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.intermediate_size, tokens)

    def flops_per_text(self) -> int:
        T, D, I = self.tokens, self.hidden, self.intermediate
        per_layer = (matmul_flops(T, 3 * D, D) + matmul_flops(T, D, D) + 2 * matmul_flops(T, I, D)
                     + 2 * matmul_flops(T, T, D))
        return self.layers * per_layer


def scale_flops(cfg, si: int, images: int = 1, guidance: bool = True) -> dict[str, int]:
    """FLOPs of the transformer at scale si for `images` images, by part."""
    N = images
    B = 2 * N if guidance else N
    C, V, T = cfg.embed_dim, cfg.vocab_size, cfg.text_len
    hidden = round(C * cfg.mlp_ratio)
    begin, end = cfg.begin_ends[si]
    l = end - begin
    depth = cfg.depth
    return {
        "self_attn_linear": depth * (matmul_flops(B * l, 3 * C, C) + matmul_flops(B * l, C, C)),
        "self_attn_scores": depth * 2 * matmul_flops(B * l, end, C),
        "cross_attn_linear": depth * 2 * matmul_flops(N * l, C, C),
        "cross_attn_scores": depth * 2 * matmul_flops(N * l, T, C),
        "ffn": depth * 2 * matmul_flops(B * l, hidden, C),
        "head": matmul_flops(B * l, V, C),
        "word_embed": matmul_flops(N * l, C, cfg.vae_channels) if si > 0 else 0,
    }


def request_flops(cfg, images: int = 1, guidance: bool = True) -> dict[str, int]:
    """Once-per-request transformer FLOPs: text K/V of every layer and the start tokens."""
    N = images
    B = 2 * N if guidance else N
    return {"text_kv": cfg.depth * matmul_flops(N * cfg.text_len, 2 * cfg.embed_dim, cfg.text_dim),
            "start_tokens": matmul_flops(B, cfg.embed_dim, cfg.text_dim)}


def sampler_head_flops(cfg, si: int, images: int = 1, guidance: bool = True) -> dict[str, int]:
    """FLOPs of the sampler head at scale si for `images` images that use it (every head step of the
    scale; {} on scales it does not refine or without a head); guidance: with unconditional rows."""
    rules = cfg.sampler_head
    if rules is None or si < rules.from_scale:
        return {}
    calls = sum(not rules.uses_base_head(si, step) for step in range(rules.steps_at(si)))
    N, B = images, (2 if guidance else 1) * images
    C, V, blocks = cfg.embed_dim, cfg.vocab_size, rules.blocks
    hidden = round(C * cfg.mlp_ratio)
    l = cfg.patch_nums[si] ** 2
    r = 1 + l
    per_call = {
        "head_word_embed": matmul_flops(N * l, C, cfg.vae_channels),
        "head_proj": matmul_flops(B * r, C, 2 * C),
        "head_attn_linear": blocks * (matmul_flops(B * r, 3 * C, C) + matmul_flops(B * r, C, C)),
        "head_attn_scores": blocks * 2 * matmul_flops(B * r, r, C),
        "head_ffn": blocks * 2 * matmul_flops(B * r, hidden, C),
        "head_logits": matmul_flops(B * l, V, C),
    }
    return {k: calls * v for k, v in per_call.items()}


def generation_flops(cfg, images: int = 1, text: TextEncoderShape | None = None, texts: int | None = None,
                     guidance: bool = True, head_images: int = 0, guidance_stop: int | None = None) -> dict:
    """All token-stage FLOPs of one batch: {'total', 'per_image', 'per_scale': [...], 'parts': {...}}.

    texts: distinct texts the text encoder runs on (default images + 1: every prompt and one shared
    empty negative prompt); the text encoder is left out when `text` is None. head_images: how many
    of the images use the sampler head (cfg.sampler_head must be set when > 0). guidance_stop: fast
    guidance of every image, the first scale without the unconditional rows (None: every scale).
    """
    if head_images and cfg.sampler_head is None:
        raise ValueError(f"{cfg.name} has no sampler head")

    def guided(si: int) -> bool:
        return guidance and (guidance_stop is None or si < guidance_stop)

    parts: dict[str, int] = dict(request_flops(cfg, images, guided(0)))
    if head_images:
        parts["head_text_rows"] = matmul_flops(2 * head_images, cfg.embed_dim, cfg.text_dim)
    per_scale = []
    for si in range(cfg.num_scales):
        f = scale_flops(cfg, si, images, guided(si))
        if head_images:
            f.update(sampler_head_flops(cfg, si, head_images, guided(si)))
        per_scale.append(sum(f.values()))
        for k, v in f.items():
            parts[k] = parts.get(k, 0) + v
    if text is not None:
        parts["text_encoder"] = text.flops_per_text() * (images + 1 if texts is None else texts)
    total = sum(parts.values())
    return {"total": total, "per_image": total / images, "per_scale": per_scale, "parts": parts}


def decoder_flops(cfg) -> int:
    """FLOPs of the VQ-VAE decode of one image (post_quant_conv + decoder): every convolution
    2 * out_elements * in_channels/groups * kh * kw, and the spatial attention's two matmuls,
    found by running the decoder on the meta device (no memory, no compute)."""
    import torch
    from torch import nn

    from model.vae_blocks import AttnBlock
    from model.vqvae import VQVAE

    total = [0]

    def conv_hook(mod, inp, out):
        kh, kw = mod.kernel_size
        total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def attn_hook(mod, inp, out):
        B, C, H, W = inp[0].shape
        total[0] += 2 * matmul_flops(B * H * W, H * W, C)

    with torch.device("meta"):
        vae = VQVAE(cfg)
        hooks = [m.register_forward_hook(conv_hook) for m in vae.modules() if isinstance(m, nn.Conv2d)]
        hooks += [m.register_forward_hook(attn_hook) for m in vae.modules() if isinstance(m, AttnBlock)]
        side = cfg.patch_nums[-1]
        vae.decoder(vae.post_quant_conv(torch.empty(1, cfg.vae_channels, side, side)))
    for h in hooks:
        h.remove()
    return total[0]


def guidance_stop_table(cfg, images: int = 1) -> list[dict]:
    """Token-stage FLOPs per image (text encoder left out) for every fast-guidance stop scale of cfg,
    from 0 to S (S: guidance on every scale, the official sampling), and the fraction they keep."""
    full = generation_flops(cfg, images)["per_image"]
    rows = []
    for stop in range(cfg.num_scales + 1):
        per_image = generation_flops(cfg, images, guidance_stop=stop)["per_image"]
        rows.append({"kind": "guidance_stop_flops", "preset": cfg.name, "guidance_stop_scale": stop,
                     "side_at_stop": cfg.patch_nums[stop] if stop < cfg.num_scales else None,
                     "flops_per_image": per_image, "fraction_of_full_guidance": per_image / full,
                     "speedup_bound": full / per_image})
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.flops --preset star-1024`: the fast-guidance FLOP table, one JSON line per stop scale."""
    import argparse
    import json

    from model.config import PRESETS

    ap = argparse.ArgumentParser(prog="python -m bench.flops", description=main.__doc__)
    ap.add_argument("--preset", default="star-1024", choices=sorted(PRESETS))
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args(argv)
    lines = [json.dumps(row) for row in guidance_stop_table(PRESETS[args.preset])]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
