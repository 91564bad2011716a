"""Transformer stage of `python -m training.train`: STAR teacher-forced on the multi-scale tokens.

One row per image, conditioned on its own caption (10% replaced by "" so the model also learns the
unconditional branch that classifier-free guidance subtracts). All L tokens are predicted at once
under the block-causal mask: the input of scale si > 0 is the area-downsampled f_hat after scale
si - 1, exactly what the sampling loop feeds (`VQVAE.teacher_forcing_inputs`). The small CLIP text
encoder is trained jointly.

`teacher_forced_logits` is the math of `StarTransformer.forward` written functionally over the
same parameters (the inference path writes its KV cache and normalises in place, which autograd
cannot differentiate through); a test keeps the two equal.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.random_init import random_transformer
from model.rope import apply_rope
from model.text import TextEncoder
from model.transformer import Block, StarTransformer
from training import shapes
from training import train_vae as tv
from training.checkpoints import load_ckpt, run_loop, vae_from

# The clock of a time budget (recipe.ar_seconds), in seconds; read at each step. Tests give it a
# clock of their own, so that what a budget trains does not depend on the machine's speed.
CLOCK = time.perf_counter


def _scaled_unit(x: torch.Tensor, scale_mul_1H11: torch.Tensor | None, max_log: float = 0.0) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    return x if scale_mul_1H11 is None else x * scale_mul_1H11.clamp_max(max_log).exp()


def block_forward(blk: Block, x_NLC: torch.Tensor, cos_Lc, sin_Lc, ctx_NTD: torch.Tensor,
                  keep_N11T: torch.Tensor, mask_LL: torch.Tensor) -> torch.Tensor:
    """One STAR block on full sequences: self-attention (L2-normalised Q/K, per-head scale, 2D RoPE,
    block-causal), cross-attention to the caption, FFN; pre-LayerNorm without affine."""
    N, L, C = x_NLC.shape
    sa, ca = blk.attn, blk.cross_attn
    H, c = sa.num_heads, sa.head_dim

    def ln(t):
        return F.layer_norm(t, t.shape[-1:], eps=blk.eps)

    qkv = F.linear(ln(x_NLC), sa.mat_qkv.weight, torch.cat((sa.q_bias, sa.zero_k_bias, sa.v_bias)))
    q, k, v = qkv.view(N, L, 3, H, c).permute(2, 0, 3, 1, 4).unbind(0)
    q = apply_rope(_scaled_unit(q, sa.scale_mul_1H11, sa.max_log_scale), cos_Lc, sin_Lc)
    k = apply_rope(_scaled_unit(k, None), cos_Lc, sin_Lc)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL, scale=1.0)
    x_NLC = x_NLC + sa.proj(o.transpose(1, 2).reshape(N, L, C))
    q = F.linear(ln(x_NLC), ca.mat_q.weight, ca.q_bias).view(N, L, H, c).transpose(1, 2)
    q = _scaled_unit(q, ca.scale_mul_1H11, ca.max_log_scale)
    T = ctx_NTD.shape[1]
    kv = F.linear(ctx_NTD, ca.mat_kv.weight, torch.cat((ca.zero_k_bias, ca.v_bias)))
    k, v = kv.view(N, T, 2, H, c).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, _scaled_unit(k, None), v, attn_mask=keep_N11T, scale=1.0)
    x_NLC = x_NLC + ca.proj(o.transpose(1, 2).reshape(N, L, C))
    return x_NLC + blk.ffn(ln(x_NLC))


def teacher_forced_logits(model: StarTransformer, pooled_ND: torch.Tensor, ctx_NTD: torch.Tensor,
                          mask_NT: torch.Tensor, f_inputs_NLCv: torch.Tensor) -> torch.Tensor:
    """Logits [N, L, V] of every token of every scale in one block-causal pass (differentiable)."""
    return model.logits(teacher_forced_hidden(model, pooled_ND, ctx_NTD, mask_NT, f_inputs_NLCv))


def teacher_forced_hidden(model: StarTransformer, pooled_ND: torch.Tensor, ctx_NTD: torch.Tensor,
                          mask_NT: torch.Tensor, f_inputs_NLCv: torch.Tensor) -> torch.Tensor:
    """The final hidden states [N, L, C] (before the logit LayerNorm) of that pass: what the sampler
    head reads of the scale it refines (training/train_head.py)."""
    cfg = model.cfg
    x = torch.cat((model.start_tokens(pooled_ND), model.word_embed(f_inputs_NLCv)), 1)
    lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(cfg.patch_nums)]).to(x.device)
    x = x + torch.cat((torch.zeros_like(model.lvl_embed.weight[:1]), model.lvl_embed(lvl_L[1:])))
    mask_LL = lvl_L[:, None] >= lvl_L[None, :]
    cos, sin = model.rope(0, cfg.L)
    keep_N11T = mask_NT.to(torch.bool)[:, None, None, :]
    for blk in model.blocks:
        x = block_forward(blk, x, cos, sin, ctx_NTD, keep_N11T, mask_LL)
    return x


def new_text_encoder(recipe) -> TextEncoder:
    return shapes.shapes_text_encoder(recipe.arch.text_dim, recipe.text_layers, seed=recipe.seed + 2,
                                      max_length=recipe.arch.text_len)


def ar_data(work: Path, recipe, text: TextEncoder, device: str | torch.device = "cpu") -> dict:
    """Targets, teacher-forcing inputs and tokenized captions of the dataset (+ the empty caption,
    last), on `device`. Captions are tokenized once per distinct caption."""
    device = torch.device(device)
    vae = vae_from(work, recipe, "quant").to(device)
    tokens = load_ckpt(work / "tokens.pt")["tokens"].to(device)
    per_scale = [tokens[:, b:e] for b, e in recipe.arch.begin_ends]
    chunk = 256 if device.type == "cpu" else 8192
    with torch.no_grad():
        x_in = torch.cat([vae.teacher_forcing_inputs([t[i:i + chunk] for t in per_scale], per_image=False)
                          for i in range(0, tokens.shape[0], chunk)])
    captions = [shapes.example_spec(recipe.data_seed, i).caption for i in range(tokens.shape[0])]
    distinct = sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    tok = text.tokenizer(distinct + [""], padding="max_length", max_length=recipe.arch.text_len, truncation=True,
                         return_tensors="pt")
    which = torch.tensor([row[c] for c in captions] + [len(distinct)])
    return {"tokens": tokens, "x_in": x_in, "ids": tok["input_ids"][which].to(device),
            "mask": tok["attention_mask"][which].to(device)}


def ar_step(model, clip, opt, data: dict, idx: torch.Tensor, drop: torch.Tensor) -> tuple[float, float]:
    ids = torch.where(drop[:, None], data["ids"][-1], data["ids"][idx])
    mask = torch.where(drop[:, None], data["mask"][-1], data["mask"][idx])
    out = clip(input_ids=ids, attention_mask=mask)
    logits = teacher_forced_logits(model, out.pooler_output, out.last_hidden_state, mask, data["x_in"][idx])
    target = data["tokens"][idx]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 2.0)
    opt.step()
    return float(loss.detach()), float((logits.argmax(-1) == target).float().mean())


def stage_ar(work: Path, recipe, log, progress: bool, device: str = "cpu", init: str | None = None) -> None:
    """init: a file with "transformer" and "text" state dicts (an ar.pt, or bench/gpu_shapes.sh's
    weights-*.pt) to start from instead of random weights (fine-tuning); ignored when resuming."""
    device = torch.device(device)
    model = random_transformer(recipe.arch, recipe.seed)
    text = new_text_encoder(recipe)
    ckpt = load_ckpt(work / "ar.pt")
    if init is not None and ckpt is None:
        start = torch.load(init, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in start["transformer"].items()})
        text.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in start["text"].items()})
        log.write(stage="ar", init=str(init))
    model = model.to(device)
    model.reset_buffers_(device)
    model.requires_grad_(True).train()
    clip = text.model.to(device).requires_grad_(True).train()
    data = ar_data(work, recipe, text, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.ar_wd},
                             {"params": rest + list(clip.parameters()), "weight_decay": 0.0}],
                            lr=recipe.ar_lr, betas=(0.9, 0.95))
    N = data["tokens"].shape[0]
    # With a time budget the schedule's position is the elapsed fraction of ar_seconds (carried over a
    # resume in the checkpoint), expressed in ar_steps units; otherwise it is the step.
    clock = {"t0": None, "before": float(ckpt.get("elapsed", 0.0)) if ckpt else 0.0}

    def elapsed() -> float:
        return clock["before"] + (CLOCK() - clock["t0"] if clock["t0"] is not None else 0.0)

    def position(step: int) -> int:
        if recipe.ar_seconds > 0:
            return min(recipe.ar_steps - 1, int(elapsed() / recipe.ar_seconds * recipe.ar_steps))
        return step

    def step_fn(step):
        if clock["t0"] is None:
            clock["t0"] = CLOCK()
        lr = tv.lr_at(position(step), recipe.ar_steps, recipe.ar_lr, warmup=max(1, recipe.ar_steps // 20))
        tv.set_lr_(opt, lr)
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        idx = torch.randint(N, (recipe.ar_batch,), generator=g).to(device)
        drop = (torch.rand(recipe.ar_batch, generator=g) < recipe.caption_dropout).to(device)
        loss, acc = ar_step(model, clip, opt, data, idx, drop)
        return loss, lr, {"token_acc": round(acc, 4)}

    stop = (lambda step: elapsed() >= recipe.ar_seconds) if recipe.ar_seconds > 0 else None
    steps = run_loop("ar", work, recipe.ar_steps, ckpt, {"transformer": model, "text": clip}, opt, step_fn, log,
                     recipe.ckpt_every, progress, extra=lambda: {"elapsed": round(elapsed(), 3)}, stop=stop)
    log.write(stage="ar", steps_done=steps, train_seconds=round(elapsed(), 3), device=str(device))
