"""The sampler head of `star-1024-sampler` (STAR's causal-driven stable sampling): weights and logits.

Owns the head's parameters, under the official key names at the top level of the checkpoint
(word_embed_head, lvl_embed_2, encoder_proj2, pos_start_last, head_proj, feat_extract_blocks.{i},
head_logits2), and one computation: the logits of every position of a scale given the tokens
committed so far. The refinement that calls it, step by step, is model/refine.py.

The head's input, per row (conditional and unconditional rows alike; B = 2N rows):
    [text ; word_embed_head(e_p) + lvl_embed_2[si] for each position p]     (1 + l rows of C)
concatenated channel-wise with
    [text ; the base model's final hidden state of p (before the logit LayerNorm)]
where text = encoder_proj2(that row's pooled text) + pos_start_last and e_p is the committed
codebook vector of p (zero where nothing is committed yet). head_proj maps the 2C channels back to
C; then blocks like the base model's without cross-attention (RoPE with the text row at position
(0, 0), no mask), a LayerNorm without affine and head_logits2 (float32). The text row's output is
dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import StarConfig
from .transformer import FFN, SelfAttention, head_scale, rope_normalize

Rope = torch.Tensor | tuple[torch.Tensor, torch.Tensor]   # complex table, or (cos, sin) (see rope_normalize)


class HeadBlock(nn.Module):
    """A base Block without cross-attention or cache: x += SA(LN x) (all rows see all rows, RoPE,
    L2-normalised Q/K); x += FFN(LN x). Same parameters (and names) as the base Block's attn/ffn."""

    def __init__(self, cfg: StarConfig):
        super().__init__()
        C, self.eps = cfg.embed_dim, cfg.norm_eps
        self.attn = SelfAttention(C, cfg.num_heads)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def _attend(self, x_BlC: torch.Tensor, rope_lc: Rope) -> torch.Tensor:
        a = self.attn
        B, l, C = x_BlC.shape
        qkv = F.linear(x_BlC, a.mat_qkv.weight, a.qkv_bias()).view(B, l, 3, a.num_heads, a.head_dim)
        q_BHlc, k_BHlc, v_BHlc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHlc = rope_normalize(q_BHlc, rope_lc, head_scale(a.scale_mul_1H11, a.max_log_scale))
        k_BHlc = rope_normalize(k_BHlc, rope_lc)
        o_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHlc, v_BHlc, scale=1.0)
        return a.proj(o_BHlc.transpose(1, 2).reshape(B, l, C))

    def forward(self, x_BlC: torch.Tensor, rope_lc: Rope) -> torch.Tensor:
        x_BlC = x_BlC + self._attend(self._ln(x_BlC), rope_lc)
        return x_BlC + self.ffn(self._ln(x_BlC))


class SamplerHead(nn.Module):
    """The optional head of a StarConfig whose `sampler_head` is set (its rules: `self.rules`)."""

    def __init__(self, cfg: StarConfig):
        super().__init__()
        if cfg.sampler_head is None:
            raise ValueError(f"config {cfg.name!r} has no sampler_head")
        self.cfg, self.rules = cfg, cfg.sampler_head
        C = cfg.embed_dim
        self.word_embed_head = nn.Linear(cfg.vae_channels, C)
        self.lvl_embed_2 = nn.Embedding(cfg.num_scales, C)
        self.encoder_proj2 = nn.Linear(cfg.text_dim, C)
        self.pos_start_last = nn.Parameter(torch.zeros(1, 1, C))
        self.head_proj = nn.Linear(2 * C, C)
        self.feat_extract_blocks = nn.ModuleList([HeadBlock(cfg) for _ in range(self.rules.blocks)])
        self.head_logits2 = nn.Linear(C, cfg.vocab_size)

    def text_rows(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        """The text row of every row: encoder_proj2(pooled text) + pos_start_last, [B, 1, C]."""
        dtype = self.pos_start_last.dtype
        return self.encoder_proj2(pooled_BD.to(dtype))[:, None, :] + self.pos_start_last

    def logits(self, e_NlCv: torch.Tensor, si: int, text_B1C: torch.Tensor, h_BlC: torch.Tensor,
               rope_lc: torch.Tensor, uncond_at: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [B, l, V] of scale si's positions, rows [conditional N; unconditional N]
        (uncond_at: [conditional N; unconditional rows of these images], as fast guidance runs them).

        e_NlCv: each image's committed codebook vectors (zero where uncommitted); text_B1C: text_rows;
        h_BlC: the base model's hidden states of this scale; rope_lc: the RoPE table of the 1 + l
        rows (position (0, 0) first)."""
        pos_NlC = self.position_rows(e_NlCv, si)
        pos_BlC = torch.cat((pos_NlC, pos_NlC if uncond_at is None else pos_NlC[uncond_at]))
        return self._rows_logits(pos_BlC, text_B1C, h_BlC, rope_lc)

    def logits_per_row(self, e_BlCv: torch.Tensor, si: int, text_B1C: torch.Tensor, h_BlC: torch.Tensor,
                       rope: Rope) -> torch.Tensor:
        """The same logits with one set of committed vectors per row (training: every row is its own
        image, conditional or not); rope may be a (cos, sin) pair (differentiable, see rope_normalize)."""
        return self._rows_logits(self.position_rows(e_BlCv, si), text_B1C, h_BlC, rope)

    def position_rows(self, e_NlCv: torch.Tensor, si: int) -> torch.Tensor:
        """word_embed_head(committed vector) + lvl_embed_2[si] of every position, [N, l, C]."""
        return self.word_embed_head(e_NlCv.to(self.pos_start_last.dtype)) + self.lvl_embed_2.weight[si]

    def _rows_logits(self, pos_BlC: torch.Tensor, text_B1C: torch.Tensor, h_BlC: torch.Tensor, rope: Rope) -> torch.Tensor:
        rows_BlC = torch.cat((text_B1C, pos_BlC), dim=1)
        ctx_BlC = torch.cat((text_B1C, h_BlC.to(pos_BlC.dtype)), dim=1)
        x_BlC = self.head_proj(torch.cat((rows_BlC, ctx_BlC), dim=-1))
        for blk in self.feat_extract_blocks:
            x_BlC = blk(x_BlC, rope)
        h = x_BlC[:, 1:].to(torch.promote_types(x_BlC.dtype, torch.float32))
        h = F.layer_norm(h, h.shape[-1:], eps=self.cfg.norm_eps)
        w = self.head_logits2
        return F.linear(h, w.weight.to(h.dtype), w.bias.to(h.dtype))
