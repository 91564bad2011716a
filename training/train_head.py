"""Sampler-head stage of `python -m training.train`: train the head of causal-driven stable sampling
on a frozen, already trained base model, and write a model directory that has it.

    python -m training.train --from-model model/zoo/shapes --stages latents,quant,head --export DIR

The task is masked prediction over the refined scales (those from the rules' `from_scale` on), one
scale at a time, as model/refine.py calls the head: for every image and refined scale a visible
fraction r ~ U(0, 1) is drawn, each position is visible with probability r (the committed tokens of
a refinement step), and the head predicts the hidden ones from exactly what it reads at sampling
time: the text row (its pooled caption), each position's committed codebook vector (zero where
hidden) and the base model's final hidden states of that scale (teacher-forced on the image's true
tokens of the earlier scales). Cross-entropy on the hidden positions only. As in the transformer
stage, a `caption_dropout` share of the images carries the empty caption (the unconditional rows
that guidance subtracts); the base model, its text encoder and its VQ-VAE are never updated.

Warm start: the head begins as the base model's own prediction. head_proj passes the base hidden
state through (identity on those channels), the blocks' output projections start at zero (each
block adds nothing yet) and head_logits2 is a copy of the base model's head_logits; the rest is
small random. Training then only has to learn what the committed tokens add.

The base model's hidden states do not change during training, so they are computed once per image
(`head_data.pt` in the work directory); the stage checkpoints to `head.pt` and logs each step.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import SamplerHeadConfig, StarConfig
from model.model_dir import load_model_dir, read_config, resolve_model_path, write_model_dir
from model.sampler_head import SamplerHead
from model.text import TextEncoder
from model.transformer import StarTransformer
from training import shapes
from training import train_vae as tv
from training.checkpoints import load_ckpt, run_loop, save_ckpt, vae_from
from training.train_ar import teacher_forced_hidden

EVAL_IMAGES = 64       # the fixed images and masks of the logged eval_loss


def head_config(base: StarConfig, rules: dict) -> StarConfig:
    """The base architecture with a sampler head following `rules` (SamplerHeadConfig fields)."""
    try:
        return base.replace(sampler_head=SamplerHeadConfig.from_dict(rules))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"head_rules {rules}: {e}") from None


def load_frozen_base(model_dir: Path) -> tuple[StarConfig, StarTransformer, TextEncoder]:
    """The base transformer (float32) and its text encoder, frozen; refuses a model that has a head."""
    _, cfg, transformer, head, _, clip_dir = load_model_dir(model_dir)
    if head is not None:
        raise SystemExit(f"--from-model {model_dir} already has a sampler head; give the model without one")
    transformer = transformer.float().eval().requires_grad_(False)
    transformer.reset_buffers_("cpu")
    return cfg, transformer, TextEncoder.from_folder(clip_dir, cfg.text_len)


@torch.no_grad()
def head_data(work: Path, recipe, cfg: StarConfig, base: StarTransformer, text: TextEncoder) -> dict:
    """Per image: its tokens, the base model's hidden states of the refined scales and which pooled
    text row it uses (its caption, or the empty one for the dropped share). Cached in head_data.pt."""
    path = work / "head_data.pt"
    cached = load_ckpt(path)
    from_scale = cfg.sampler_head.from_scale
    tokens = load_ckpt(work / "tokens.pt")["tokens"]
    key = {"from_scale": from_scale, "caption_dropout": recipe.caption_dropout, "seed": recipe.seed}
    if cached is not None and cached.get("key") == key and torch.equal(cached["tokens"], tokens):
        return cached                    # the same images (tokens), refined scales and dropped captions
    vae = vae_from(work, recipe, "quant")
    N = tokens.shape[0]
    captions = [shapes.example_spec(recipe.data_seed, i).caption for i in range(N)]
    g = torch.Generator().manual_seed(recipe.seed + 11)
    dropped = (torch.rand(N, generator=g) < recipe.caption_dropout).tolist()
    distinct = sorted(set(captions)) + [""]
    row = {c: i for i, c in enumerate(distinct)}
    enc = text.encode(distinct)
    which = torch.tensor([row["" if d else c] for c, d in zip(captions, dropped)])
    begin = cfg.begin_ends[from_scale][0]
    hidden = []
    for i in range(0, N, 64):
        part = tokens[i:i + 64]
        x_in = vae.teacher_forcing_inputs([part[:, b:e] for b, e in cfg.begin_ends], per_image=False)
        w = which[i:i + 64]
        h = teacher_forced_hidden(base, enc.pooled_BD[w], enc.hidden_BTD[w], enc.mask_BT[w], x_in)
        hidden.append(h[:, begin:].clone())
    data = {"tokens": tokens, "hidden": torch.cat(hidden), "which": which, "pooled": enc.pooled_BD,
            "codebook": vae.quantize.embedding.weight.detach().clone(), "key": key}
    save_ckpt(path, data)
    return data


def warm_start_(head: SamplerHead, base: StarTransformer, seed: int) -> SamplerHead:
    """Initialise the head to reproduce the base model's logits (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    C = head.cfg.embed_dim
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g).mul_(0.02) if p.dim() >= 2 else torch.zeros_like(p))
        head.pos_start_last.zero_()
        head.head_proj.weight[:, C:].copy_(torch.eye(C))
        for blk in head.feat_extract_blocks:
            blk.attn.proj.weight.zero_()
            blk.ffn.fc2.weight.zero_()
            blk.attn.scale_mul_1H11.copy_(base.blocks[0].attn.scale_mul_1H11)
        head.head_logits2.weight.copy_(base.head_logits.weight)
        head.head_logits2.bias.copy_(base.head_logits.bias)
    return head


def masked_loss(head: SamplerHead, data: dict, idx: torch.Tensor, g: torch.Generator, ropes: dict) -> torch.Tensor:
    """Mean cross-entropy on the hidden positions of every refined scale of the images idx."""
    cfg, from_scale = head.cfg, head.rules.from_scale
    text_B1C = head.text_rows(data["pooled"][data["which"][idx]])
    offset = cfg.begin_ends[from_scale][0]
    total, count = torch.zeros(()), torch.zeros(())
    for si in range(from_scale, cfg.num_scales):
        b, e = cfg.begin_ends[si]
        tok_Bl = data["tokens"][idx, b:e]
        visible_Bl = torch.rand(tok_Bl.shape, generator=g) < torch.rand(len(idx), 1, generator=g)
        e_BlCv = data["codebook"][tok_Bl] * visible_Bl[..., None]
        logits = head.logits_per_row(e_BlCv, si, text_B1C, data["hidden"][idx, b - offset:e - offset], ropes[si])
        ce = F.cross_entropy(logits.flatten(0, 1), tok_Bl.flatten(), reduction="none")
        hidden_mask = (~visible_Bl).flatten().float()
        total, count = total + (ce * hidden_mask).sum(), count + hidden_mask.sum()
    return total / count.clamp_min(1)


def head_ropes(base: StarTransformer, cfg: StarConfig) -> dict:
    """(cos, sin) RoPE of [(0, 0); the scale] for every refined scale (as the sampling loop builds it)."""
    out = {}
    for si in range(cfg.sampler_head.from_scale, cfg.num_scales):
        b, e = cfg.begin_ends[si]
        (cos0, sin0), (cos, sin) = base.rope(0, 1), base.rope(b, e)
        out[si] = (torch.cat((cos0, cos)), torch.cat((sin0, sin)))
    return out


def eval_loss(head: SamplerHead, data: dict, ropes: dict, seed: int) -> float:
    """Hidden-token loss on the first EVAL_IMAGES images with fixed masks (comparable across steps)."""
    n = min(EVAL_IMAGES, data["tokens"].shape[0])
    with torch.no_grad():
        return float(masked_loss(head, data, torch.arange(n), torch.Generator().manual_seed(seed + 97), ropes))


def stage_head(work: Path, recipe, base_dir: str, out: Path, log, progress: bool) -> Path:
    """Train the sampler head of the model in base_dir (frozen) and write `out` (base + head)."""
    base_path = resolve_model_path(base_dir)
    base_cfg, base, text = load_frozen_base(base_path)
    cfg = head_config(base_cfg, dict(recipe.head_rules))
    data, ropes = head_data(work, recipe, cfg, base, text), head_ropes(base, cfg)
    torch.manual_seed(recipe.seed)
    head = warm_start_(SamplerHead(cfg), base, recipe.seed + 5).train()
    ckpt = load_ckpt(work / "head.pt")
    first = ckpt["eval_loss_start"] if ckpt else eval_loss(head, data, ropes, recipe.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.head_lr, betas=(0.9, 0.95), weight_decay=0.0)
    N = data["tokens"].shape[0]
    t0 = time.perf_counter()

    def step_fn(step):
        lr = tv.lr_at(step, recipe.head_steps, recipe.head_lr, warmup=max(1, recipe.head_steps // 20))
        tv.set_lr_(opt, lr)
        g = torch.Generator().manual_seed(recipe.seed * 1_000_033 + step)
        loss = masked_loss(head, data, torch.randint(N, (recipe.head_batch,), generator=g), g, ropes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 2.0)
        opt.step()
        return float(loss.detach()), lr, {}

    steps = run_loop("head", work, recipe.head_steps, ckpt, {"head": head}, opt, step_fn, log, recipe.ckpt_every,
                     progress, extra={"eval_loss_start": first})
    last = eval_loss(head.eval(), data, ropes, recipe.seed)
    trained = {"steps": steps, "images": N, "eval_loss_start": round(first, 5), "eval_loss_end": round(last, 5),
               "seconds": round(time.perf_counter() - t0, 1)}
    log.write(stage="head", **trained)
    return export_with_head(base_path, cfg, head, out, recipe, trained)


def export_with_head(base_path: Path, cfg: StarConfig, head: SamplerHead, out: Path, recipe, trained: dict) -> Path:
    """A copy of the base model directory (its weights untouched) plus the head's weights and rules."""
    from safetensors.torch import load_file

    config = read_config(base_path)
    base_sd = load_file(base_path / "transformer.safetensors")
    dtype = next(iter(base_sd.values())).dtype
    head_sd = {k: v.detach().to(dtype) for k, v in head.state_dict().items()}
    source = dict(config.get("source") or {})
    source["sampler_head"] = {"trained_by": "python -m training.train (stage head)", "base_model": str(base_path),
                              "rules": dict(recipe.head_rules), "batch": recipe.head_batch, "lr": recipe.head_lr,
                              "caption_dropout": recipe.caption_dropout, "data_seed": recipe.data_seed, **trained}
    out.mkdir(parents=True, exist_ok=True)
    write_model_dir(out, cfg, {**base_sd, **head_sd}, load_file(base_path / "vae.safetensors"),
                    TextEncoder.from_folder(base_path / "CLIP", cfg.text_len), transformer_dtype=dtype,
                    vae_dtype=getattr(torch, config.get("vae_dtype", "float32")), source=source,
                    sampling=config.get("sampling"))
    return out
