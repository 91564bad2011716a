"""STAR's transformer: VAR next-scale prediction with text cross-attention and normalized 2D RoPE.

Parameter names match the official checkpoints key for key. Rows of a batch are laid out as
[conditional rows of N images; unconditional rows of the same N images] (B = 2N). Cross-attention
runs on the N conditional rows only and its output is added to both rows of the same image, which
is what the official single-image call computes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import StarConfig
from .kv_cache import KVCache
from .rope import apply_rope, rope_tables

SAMPLER_HEAD_PREFIXES = ("word_embed_head.", "feat_extract_blocks.", "pos_start_last", "head_logits2.",
                         "encoder_proj2.", "head_proj.", "lvl_embed_2.")


def head_scale(scale_mul_1H11: torch.Tensor, max_log: float) -> torch.Tensor:
    """exp(min(scale_mul, max_log)) per head, [1, H, 1, 1] float32 (computed once per request)."""
    return scale_mul_1H11.float().clamp_max(max_log).exp()


def rope_normalize(x_BHlc: torch.Tensor, rope, scale_1H11: torch.Tensor | None = None,
                   out_BHlc: torch.Tensor | None = None) -> torch.Tensor:
    """x / |x| (times a per-head scale), rotated by RoPE; computed in float32 (at least).

    rope is the complex table [l, c/2] (cos + i sin of the interleaved pairs): rotation first, one
    complex multiply, then the normalisation of the rotated vector (a rotation keeps the norm), so a
    head vector is touched by three kernels instead of about a dozen. rope may also be a (cos, sin)
    pair: the same math in real arithmetic (for autograd and torch.compile, which fuses it anyway).
    `out_BHlc` (e.g. the KV cache's slot) receives the result when given; otherwise a new tensor in
    x's dtype is returned.
    """
    compute = torch.promote_types(x_BHlc.dtype, torch.float32)
    x = x_BHlc if x_BHlc.dtype == compute else x_BHlc.to(compute)
    if not isinstance(rope, torch.Tensor):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        factor = norm.reciprocal() if scale_1H11 is None else scale_1H11.to(compute) / norm
        r = apply_rope(x * factor, rope[0], rope[1])
        return r.to(x_BHlc.dtype) if out_BHlc is None else out_BHlc.copy_(r)
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    freqs = rope if rope.dtype == xc.dtype else rope.to(xc.dtype)
    direct = out_BHlc is not None and out_BHlc.dtype == compute and not x.requires_grad
    if direct:
        r = out_BHlc
        torch.mul(xc, freqs, out=torch.view_as_complex(r.unflatten(-1, (-1, 2))))
    else:
        r = torch.view_as_real(xc * freqs).flatten(-2)
    norm = torch.linalg.vector_norm(r, dim=-1, keepdim=True).clamp_min(1e-12)
    factor = norm.reciprocal() if scale_1H11 is None else scale_1H11.to(compute) / norm
    r = r * factor if r.requires_grad else r.mul_(factor)
    if direct:
        return r
    return r.to(x_BHlc.dtype) if out_BHlc is None else out_BHlc.copy_(r)


class SelfAttention(nn.Module):
    """Multi-head self-attention with L2-normalised Q/K, a learned per-head scale and 2D RoPE."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.max_log_scale = math.log(100.0)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def qkv_bias(self) -> torch.Tensor:
        return torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))

    def forward(self, x_BlC: torch.Tensor, rope, cache, layer: int, begin: int,
                attn_mask: torch.Tensor | None = None, consts: "LayerConsts | None" = None) -> torch.Tensor:
        """rope: the RoPE table of these tokens (complex [l, c/2] or a (cos, sin) pair, see
        rope_normalize); consts: per-request constants of this layer, else computed here."""
        B, l, C = x_BlC.shape
        bias = consts.qkv_bias if consts is not None else self.qkv_bias()
        scale = consts.sa_scale if consts is not None else head_scale(self.scale_mul_1H11, self.max_log_scale)
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, self.head_dim)
        q_BHlc, k_BHlc, v_BHlc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHlc = rope_normalize(q_BHlc, rope, scale)
        if isinstance(cache, KVCache) and not x_BlC.requires_grad:
            k_slot, v_slot = cache.slots(layer, begin, B, l)
            rope_normalize(k_BHlc, rope, None, out_BHlc=k_slot)
            v_slot.copy_(v_BHlc)
            k_BHLc, v_BHLc = cache.prefix(layer, B, begin + l)
        else:
            k_BHLc, v_BHLc = cache.write_kv_(layer, begin, rope_normalize(k_BHlc, rope), v_BHlc)
        o_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHLc, v_BHLc, attn_mask=attn_mask, scale=1.0)
        return self.proj(o_BHlc.transpose(1, 2).reshape(B, l, C))


class CrossAttention(nn.Module):
    """Attention from image tokens to the text's hidden states (no RoPE); text K/V computed once."""

    def __init__(self, embed_dim: int, text_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.max_log_scale = math.log(100.0)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.mat_kv = nn.Linear(text_dim, 2 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def text_kv(self, ctx_NTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (L2-normalised) and V of the text, each [N, H, T, c]."""
        N, T, _ = ctx_NTD.shape
        bias = torch.cat((self.zero_k_bias, self.v_bias))
        kv = F.linear(ctx_NTD, self.mat_kv.weight, bias).view(N, T, 2, self.num_heads, self.head_dim)
        k_NHTc, v_NHTc = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.normalize(k_NHTc, dim=-1), v_NHTc

    def forward(self, x_NlC: torch.Tensor, k_NHTc: torch.Tensor, v_NHTc: torch.Tensor,
                mask_N11T: torch.Tensor, scale_1H11: torch.Tensor | None = None) -> torch.Tensor:
        """mask_N11T: additive (0 / -inf, in the query's dtype) or boolean (True = attend)."""
        N, l, C = x_NlC.shape
        q = F.linear(x_NlC, self.mat_q.weight, self.q_bias).view(N, l, self.num_heads, self.head_dim)
        if scale_1H11 is None:
            scale_1H11 = head_scale(self.scale_mul_1H11, self.max_log_scale)
        q = q.transpose(1, 2)
        norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12)
        q_NHlc = q * (scale_1H11.to(q.dtype) / norm)
        o_NHlc = F.scaled_dot_product_attention(q_NHlc, k_NHTc, v_NHTc, attn_mask=mask_N11T, scale=1.0)
        return self.proj(o_NHlc.transpose(1, 2).reshape(N, l, C))


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm block: x += SA(LN x); x += CA(LN x) (conditional rows, added to both); x += FFN(LN x)."""

    def __init__(self, cfg: StarConfig):
        super().__init__()
        C, self.eps = cfg.embed_dim, cfg.norm_eps
        self.attn = SelfAttention(C, cfg.num_heads)
        self.cross_attn = CrossAttention(C, cfg.text_dim, cfg.num_heads)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(self, x_BlC: torch.Tensor, rope, cache: KVCache, layer: int, begin: int, text: "TextKV",
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """rope: complex RoPE table [l, c/2] of these tokens, or a (cos, sin) pair."""
        consts = text.consts[layer] if text.consts is not None else None
        x_BlC = x_BlC + self.attn(self._ln(x_BlC), rope, cache, layer, begin, attn_mask, consts)
        k_NHTc, v_NHTc = text.kv[layer]
        N = k_NHTc.shape[0]
        ca_NlC = self.cross_attn(self._ln(x_BlC[:N]), k_NHTc, v_NHTc, text.mask_N11T,
                                 consts.ca_scale if consts is not None else None)
        if text.uncond_at is None:   # image n's output to rows n and N + n
            x_BlC = (x_BlC.unflatten(0, (-1, N)) + ca_NlC).flatten(0, 1)
        else:                        # rows [cond N; uncond of the images uncond_at]
            x_BlC = x_BlC + torch.cat((ca_NlC, ca_NlC[text.uncond_at]))
        return x_BlC + self.ffn(self._ln(x_BlC))


class LayerConsts:
    """What one layer needs on every scale but computes once per request: the fused QKV bias and
    the per-head scales of self- and cross-attention (float32, [1, H, 1, 1])."""

    def __init__(self, blk: Block):
        self.qkv_bias = blk.attn.qkv_bias()
        self.sa_scale = head_scale(blk.attn.scale_mul_1H11, blk.attn.max_log_scale)
        self.ca_scale = head_scale(blk.cross_attn.scale_mul_1H11, blk.cross_attn.max_log_scale)


class TextKV:
    """Per-request conditioning of every layer: K/V of the conditional prompt, its mask (additive,
    in the model's dtype, or boolean) and the per-layer constants (None: computed per call).

    uncond_at: None for rows [cond N; uncond N]; else the images (int64 [M]) whose unconditional
    rows follow the N conditional ones on this scale (fast guidance: the others stopped)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask_N11T: torch.Tensor,
                 consts: list[LayerConsts] | None = None, uncond_at: torch.Tensor | None = None):
        self.kv, self.mask_N11T, self.consts, self.uncond_at = kv, mask_N11T, consts, uncond_at

    def with_rows(self, uncond_at: torch.Tensor | None) -> "TextKV":
        """The same conditioning for a scale whose unconditional rows are those of uncond_at."""
        return self if uncond_at is None else TextKV(self.kv, self.mask_N11T, self.consts, uncond_at)


class StarTransformer(nn.Module):
    def __init__(self, cfg: StarConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.word_embed = nn.Linear(cfg.vae_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # kept for strict loading; STAR never reads it
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(cfg.num_scales, C)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.head_logits = nn.Linear(C, cfg.vocab_size)
        self.encoder_proj = nn.Linear(cfg.text_dim, C)
        self.reset_buffers_()

    def reset_buffers_(self, device: torch.device | str | None = None) -> None:
        """(Re)build the non-persistent tables (RoPE, block-causal mask); needed after meta-device init."""
        cfg = self.cfg
        device = device or self.pos_start.device
        with torch.device("cpu"):
            cos_Lc, sin_Lc = rope_tables(cfg.patch_nums, cfg.head_dim, cfg.rope_theta, cfg.rope_norm)
        self.register_buffer("rope_cos_Lc", cos_Lc.to(device), persistent=False)
        self.register_buffer("rope_sin_Lc", sin_Lc.to(device), persistent=False)
        # the same table as complex numbers (cos + i sin), float32 whatever the weights' dtype; a plain
        # attribute, so Module.to(dtype) never casts it to real (rope_freqs follows the device)
        self.rope_freqs_Lc = torch.complex(cos_Lc, sin_Lc).to(device)

    # ---- pieces of one scale step -------------------------------------------------------------
    def text_kv(self, ctx_NTD: torch.Tensor, mask_NT: torch.Tensor) -> TextKV:
        """Text K/V of every layer, once per request (not per scale, not for unconditional rows)."""
        dtype = self.pos_start.dtype
        ctx_NTD = ctx_NTD.to(dtype)
        kv = [blk.cross_attn.text_kv(ctx_NTD) for blk in self.blocks]
        keep_N11T = mask_NT.to(torch.bool)[:, None, None, :]
        mask_N11T = torch.zeros(keep_N11T.shape, dtype=dtype, device=ctx_NTD.device)
        mask_N11T.masked_fill_(~keep_N11T, -torch.inf)
        return TextKV(kv, mask_N11T, [LayerConsts(blk) for blk in self.blocks])

    def start_tokens(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        """Scale-0 input: encoder_proj(pooled text) + pos_start + lvl_embed[0], [B, 1, C]."""
        sos_BC = self.encoder_proj(pooled_BD.to(self.pos_start.dtype))
        return sos_BC[:, None, :] + self.pos_start + self.lvl_embed.weight[0]

    def scale_tokens(self, f_next_BlCv: torch.Tensor, si: int) -> torch.Tensor:
        """Input of scale si > 0: word_embed(area-downsampled f_hat) + lvl_embed[si]."""
        return self.word_embed(f_next_BlCv.to(self.pos_start.dtype)) + self.lvl_embed.weight[si]

    def rope(self, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos_Lc[begin:end], self.rope_sin_Lc[begin:end]

    def rope_freqs(self, begin: int, end: int) -> torch.Tensor:
        """Complex RoPE table of tokens [begin, end) (float32 pairs) on the model's device."""
        if self.rope_freqs_Lc.device != self.pos_start.device:
            self.reset_buffers_(self.pos_start.device)
        return self.rope_freqs_Lc[begin:end]

    def blocks_forward(self, x_BlC: torch.Tensor, si: int, cache: KVCache, text: TextKV) -> torch.Tensor:
        begin, end = self.cfg.begin_ends[si]
        # under torch.compile the real (cos, sin) form: inductor fuses it and has no complex kernels
        rope = self.rope(begin, end) if torch.compiler.is_compiling() else self.rope_freqs(begin, end)
        for layer, blk in enumerate(self.blocks):
            x_BlC = blk(x_BlC, rope, cache, layer, begin, text)
        return x_BlC

    def scale_logits(self, x_BlC: torch.Tensor, si: int, cache: KVCache, text: TextKV) -> torch.Tensor:
        """One scale step: the blocks (writing this scale's K/V into the cache), then the head's
        float32 logits [B, l, V]. The unit that model/compile.py compiles."""
        return self.logits(self.blocks_forward(x_BlC, si, cache, text))

    def logits(self, x_BlC: torch.Tensor) -> torch.Tensor:
        """LayerNorm without affine, then head_logits, in the wider of x's and the head's dtype;
        returned as float32 at least (sampling always runs in float32)."""
        h = x_BlC.to(torch.promote_types(x_BlC.dtype, self.head_logits.weight.dtype))
        if self.cfg.logit_norm:
            h = F.layer_norm(h, h.shape[-1:], eps=self.cfg.norm_eps)
        logits = F.linear(h, self.head_logits.weight.to(h.dtype), self.head_logits.bias.to(h.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    # ---- teacher-forced full sequence (reference / tests) ---------------------------------------
    def forward(self, pooled_BD: torch.Tensor, text: TextKV, f_inputs_BLCv: torch.Tensor) -> torch.Tensor:
        """Logits of all L tokens at once with a block-causal mask.

        f_inputs_BLCv holds, for every scale si > 0, the area-downsampled f_hat after scale si - 1
        (L - 1 rows of Cvae features, scale order), as in VAR's teacher forcing.
        """
        cfg = self.cfg
        x_BLC = torch.cat((self.start_tokens(pooled_BD), self.word_embed(f_inputs_BLCv.to(self.pos_start.dtype))), 1)
        lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(cfg.patch_nums)]).to(x_BLC.device)
        x_BLC = x_BLC + torch.cat((torch.zeros_like(self.lvl_embed.weight[:1]), self.lvl_embed(lvl_L[1:])))
        mask_LL = lvl_L[:, None] >= lvl_L[None, :]
        cache = KVCache.for_config(cfg, x_BLC.shape[0], x_BLC.dtype, x_BLC.device)
        rope = self.rope_freqs(0, cfg.L)
        for layer, blk in enumerate(self.blocks):
            x_BLC = blk(x_BLC, rope, cache, layer, 0, text, attn_mask=mask_LL)
        return self.logits(x_BLC)
