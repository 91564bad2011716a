"""Bytes one image needs at each size, and the largest batch that fits in free device memory.

Counted from the architecture (model/config.py), not measured:
  weights      transformer (its dtype; head float32), VQ-VAE (its dtype), text encoder (when known)
  per image    the static KV cache: K and V of every layer for 2 rows (guidance) and the prefix
               tokens (all scales but the last), plus one shared stretch for the last scale;
               the activations of the largest scale (2 rows x l tokens of the block's widest
               intermediates) and the float32 logits / sampling buffers of that scale
  per decode   the VQ-VAE decoder's activations for one decode call (`decode(chunk=1)` decodes one
               image at a time, so this does not grow with the batch)
The activation figures are deliberately generous (several live copies of the widest tensor);
`max_batch` also keeps a safety margin of the free memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .config import StarConfig


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def transformer_params(cfg: StarConfig) -> tuple[int, int]:
    """(parameters in the transformer's dtype, head_logits parameters kept float32)."""
    C, D, V, Cv = cfg.embed_dim, cfg.text_dim, cfg.vocab_size, cfg.vae_channels
    hidden = round(C * cfg.mlp_ratio)
    H = cfg.num_heads
    block = (C * 3 * C + 2 * C + H + C * C + C          # self-attention (+ q/v bias, scale, proj)
             + C * C + D * 2 * C + 2 * C + H + C * C + C  # cross-attention
             + C * hidden + hidden + hidden * C + C)      # FFN
    other = (Cv * C + C + (cfg.num_classes + 1) * C + C + cfg.num_scales * C + D * C + C)
    return cfg.depth * block + other, C * V + V


def vae_params(cfg: StarConfig) -> int:
    with torch.device("meta"):
        from .vqvae import VQVAE

        return sum(p.numel() for p in VQVAE(cfg).parameters())


def kv_cache_tokens(cfg: StarConfig) -> int:
    """Tokens per row, head and K/V that KVCache.for_config stores: every layer's prefix (the
    L - l_last tokens of all scales but the last) and one stretch of l_last that the layers take in
    turn for the last scale (model/kv_cache.py)."""
    last = cfg.patch_nums[-1] ** 2
    return cfg.depth * (cfg.L - last) + last


def kv_cache_bytes_per_image(cfg: StarConfig, dtype: torch.dtype) -> int:
    """K and V, 2 rows (conditional + unconditional), kv_cache_tokens each: KVCache's size."""
    return 2 * 2 * cfg.num_heads * kv_cache_tokens(cfg) * cfg.head_dim * _itemsize(dtype)


def step_bytes_per_image(cfg: StarConfig, dtype: torch.dtype) -> int:
    """Transformer activations and sampling buffers at the largest scale, per image (generous)."""
    l = cfg.patch_nums[-1] ** 2
    C, V = cfg.embed_dim, cfg.vocab_size
    hidden = round(C * cfg.mlp_ratio)
    rows = 2
    # x, LN(x), QKV (3C), q (C, float32 during RoPE), attention output, projection, FFN hidden x 2
    per_token = (C + C + 3 * C + C + C + C + 2 * hidden) * _itemsize(dtype) + 2 * C * 4
    attention_scores = 0  # fused attention (SDPA) keeps no l x L score matrix
    logits = rows * l * V * 4 + 3 * l * V * 4   # float32 logits of both rows; guided, noise, candidates
    return rows * l * per_token + attention_scores + logits


def decode_bytes(cfg: StarConfig, vae_dtype: torch.dtype = torch.float32, chunk: int = 1) -> int:
    """VQ-VAE decoder activations of one decode call of `chunk` images: about five live maps of
    the widest resolution (the image size at vae_ch * ch_mult[0] channels), plus the spatial
    attention of the lowest resolution."""
    side = cfg.image_size
    widest = side * side * cfg.vae_ch * max(cfg.vae_ch_mult[0], cfg.vae_ch_mult[1] if len(cfg.vae_ch_mult) > 1 else 1)
    lowest = cfg.patch_nums[-1] ** 2
    attention = lowest * lowest * 4 + 4 * lowest * cfg.vae_ch * cfg.vae_ch_mult[-1] * 4
    return chunk * (5 * widest * _itemsize(vae_dtype) + attention)


@dataclass(frozen=True)
class MemoryPlan:
    """What a pipeline needs on its device, in bytes (see the module docstring)."""

    image_size: int
    weights_bytes: int
    kv_cache_bytes_per_image: int
    step_bytes_per_image: int
    decode_bytes: int

    @property
    def per_image_bytes(self) -> int:
        return self.kv_cache_bytes_per_image + self.step_bytes_per_image

    def total_bytes(self, images: int) -> int:
        return self.weights_bytes + self.decode_bytes + images * self.per_image_bytes

    def max_batch(self, free_bytes: int, margin: float = 0.1, weights_loaded: bool = True) -> int:
        """Most images that fit in free_bytes after keeping `margin` (a fraction) of it free.
        weights_loaded: free_bytes was read after the model was loaded (weights already taken)."""
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be a fraction in [0, 1), got {margin}")
        usable = free_bytes * (1 - margin) - self.decode_bytes - (0 if weights_loaded else self.weights_bytes)
        return max(0, int(usable // self.per_image_bytes))

    def as_dict(self) -> dict:
        return {**asdict(self), "per_image_bytes": self.per_image_bytes}


def plan_for_config(cfg: StarConfig, dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32,
                    text_encoder_bytes: int = 0, fp32_head: bool = True) -> MemoryPlan:
    body, head = transformer_params(cfg)
    weights = (body * _itemsize(dtype) + head * (4 if fp32_head else _itemsize(dtype))
               + vae_params(cfg) * _itemsize(vae_dtype) + text_encoder_bytes)
    return MemoryPlan(cfg.image_size, weights, kv_cache_bytes_per_image(cfg, dtype),
                      step_bytes_per_image(cfg, dtype), decode_bytes(cfg, vae_dtype))


def plan_for_pipeline(pipe) -> MemoryPlan:
    """The plan of a loaded StarPipeline (its dtypes; weights counted from its actual tensors)."""
    def nbytes(module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    vae_dtype = next(pipe.vae.parameters()).dtype
    cfg = pipe.cfg
    weights = nbytes(pipe.transformer) + nbytes(pipe.vae) + nbytes(pipe.text_encoder.model)
    return MemoryPlan(cfg.image_size, weights, kv_cache_bytes_per_image(cfg, pipe.dtype),
                      step_bytes_per_image(cfg, pipe.dtype), decode_bytes(cfg, vae_dtype))


def free_device_bytes(device) -> int | None:
    """Free memory of a CUDA device (None elsewhere: CPU batches are set by hand)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
