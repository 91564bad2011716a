"""StarPipeline: prompts in, images out (the interface the worker calls; see docs/CONTRACTS.md).

Stages, each callable on its own so a benchmark can time them:
    encode_prompts(prompts, negative_prompts) -> (Conditioning, truncated flags)
    sample_tokens(cond, requests, on_scale)   -> ScaleOutput (tokens per scale, f_hat)
    decode(f_hat)                             -> float images [N, 3, H, W] in [0, 1]
`generate(requests)` chains them for one batch.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy
import torch

from .autoregress import Conditioning, ScaleOutput, sample_scales
from .config import PRESETS, StarConfig
from .kv_cache import KVCache
from .model_dir import example_prompts, is_model_dir, load_model_dir, parse_dtype, sampling_defaults
from .random_init import random_sampler_head, random_transformer, random_vae
from .request import OFFICIAL_SAMPLING, SAMPLERS, ImageRequest, ImageResult, resolve_sampler
from .sampler import RowParams, make_generators
from .sampler_head import SamplerHead
from .text import TextEncoder, byte_level_clip_tokenizer, random_clip_text_model
from .transformer import StarTransformer
from .vqvae import VQVAE
from .weights import ModelFileNotFoundError, load_official

log = logging.getLogger(__name__)
__all__ = ["StarPipeline", "ImageRequest", "ImageResult", "OFFICIAL_SAMPLING", "SAMPLERS", "images_to_uint8"]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)


def place_transformer_(model: StarTransformer, device: torch.device, dtype: torch.dtype,
                       fp32_head: bool = True) -> StarTransformer:
    """Cast from outside the model: weights to dtype, head_logits kept float32, RoPE rebuilt in float32."""
    model.to(device=device, dtype=dtype)
    if fp32_head:
        model.head_logits.float()
    model.reset_buffers_(device)
    return model


# Images per VQ-VAE decoder call, per device type, where a batched call is proven bit-identical
# to one image per call. CPU, float32: yes (oneDNN convolutions and image-by-image GroupNorm,
# model/vae_blocks.py; tests/model/test_decode_batch.py), in chunks of 8 to bound the decoder's
# memory. CUDA: not proven (cuDNN chooses its convolution algorithms by shape, batch size
# included; `python -m bench.decode` checks it on a GPU), so one image per call. Anything else: 1.
BATCH_INVARIANT_DECODE_CHUNK = {"cpu": 8}


def decode_chunk_for(device: torch.device, vae_dtype: torch.dtype) -> int:
    """Images per decoder call that keep every image independent of its batch (see above)."""
    if vae_dtype != torch.float32:
        return 1
    return BATCH_INVARIANT_DECODE_CHUNK.get(torch.device(device).type, 1)


def images_to_uint8(img_N3HW: torch.Tensor) -> numpy.ndarray:
    """[0, 1] floats -> uint8 [N, H, W, 3] (rounded)."""
    return img_N3HW.float().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class StarPipeline:
    def __init__(self, name: str, cfg: StarConfig, transformer: StarTransformer, vae: VQVAE,
                 text_encoder: TextEncoder, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", *, vae_dtype: str | torch.dtype = "float32",
                 fp32_head: bool = True, sampler_head: SamplerHead | None = None):
        """vae_dtype and fp32_head=False lower the precision of the decode / the logits (only on request).
        sampler_head: the optional head of causal-driven stable sampling (cfg.sampler_head set)."""
        if (sampler_head is None) != (cfg.sampler_head is None):
            raise ValueError(f"model {name!r}: config {'has' if cfg.sampler_head else 'has no'} sampler_head, "
                             f"but the sampler head module was {'not ' if sampler_head is None else ''}given")
        self.name, self.cfg = name, cfg
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.image_size, self.patch_nums = cfg.image_size, cfg.patch_nums
        self.transformer = place_transformer_(transformer, self.device, self.dtype, fp32_head)
        self.sampler_head = sampler_head
        if sampler_head is not None:
            sampler_head.to(device=self.device, dtype=self.dtype)
            if fp32_head:
                sampler_head.head_logits2.float()
        self.vae = vae.to(device=self.device, dtype=resolve_dtype(vae_dtype, self.device))
        if self.device.type == "cpu":   # oneDNN convolutions run ~10% faster on channels-last maps
            self.vae.decoder.to(memory_format=torch.channels_last)
            self.vae.post_quant_conv.to(memory_format=torch.channels_last)
        self.text_encoder = text_encoder.to(self.device)
        # images per VQ-VAE decoder call: more than one only where that is bit-identical (decode_chunk_for)
        self.decode_chunk = decode_chunk_for(self.device, next(self.vae.parameters()).dtype)
        self._cache: KVCache | None = None
        # The model directory's recommended cfg/top_k/top_p/temperature (config.json "sampling";
        # {} for presets): what a request's unset fields get (with_defaults), here and in the service.
        self.sampling: dict = {}
        self.example_prompts: list[str] = []   # config.json "example_prompts": what the model draws well

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, device: str = "cpu", dtype: str | torch.dtype = "float32",
             trust_pickle: bool = False, **precision) -> "StarPipeline":
        """A model directory (written by `python -m model.convert`) or a preset name (random weights).

        trust_pickle only matters where a pickle is read (`from_official`); model directories hold
        safetensors and the CLIP folder only. precision: vae_dtype=, fp32_head= (see __init__).
        """
        if spec in PRESETS and not Path(spec).exists():
            return cls.from_preset(spec, device=device, dtype=dtype, **precision)
        if not is_model_dir(spec):
            raise ModelFileNotFoundError(
                f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a model directory with a config.json")
        name, cfg, transformer, head, vae, clip_dir = load_model_dir(spec)
        text = TextEncoder.from_folder(clip_dir, cfg.text_len)
        pipe = cls(Path(spec).name, cfg, transformer, vae, text, device, dtype, sampler_head=head, **precision)
        pipe.sampling = sampling_defaults(spec)
        pipe.example_prompts = example_prompts(spec)
        return pipe

    @classmethod
    def from_preset(cls, name: str, device: str = "cpu", dtype: str | torch.dtype = "float32",
                    seed: int = 0, **precision) -> "StarPipeline":
        """Preset architecture with deterministic random weights and a small random CLIP."""
        cfg = PRESETS[name]
        text = TextEncoder(byte_level_clip_tokenizer(), random_clip_text_model(cfg.text_dim, seed + 2), cfg.text_len)
        head = random_sampler_head(cfg, seed + 3) if cfg.sampler_head is not None else None
        return cls(name, cfg, random_transformer(cfg, seed), random_vae(cfg, seed + 1), text, device, dtype,
                   sampler_head=head, **precision)

    @classmethod
    def from_official(cls, ar_path: str | Path, vae_path: str | Path, clip_dir: str | Path, *,
                      device: str = "cpu", dtype: str | torch.dtype = "float32", trust_pickle: bool = False,
                      name: str | None = None, use_sampler_head: bool | None = None,
                      sampler_rules: dict | None = None, **precision) -> "StarPipeline":
        """Straight from the official `.pth` files and `CLIP/` folder (slower than a model directory).

        use_sampler_head: None keeps a sampler head the checkpoint has, True requires one, False
        leaves it out; sampler_rules: its refinement rules (default: the release's).
        """
        cfg, transformer, vae, head = load_official(ar_path, vae_path, name=name, trust_pickle=trust_pickle,
                                                    use_sampler_head=use_sampler_head, sampler_rules=sampler_rules)
        text = TextEncoder.from_folder(clip_dir, cfg.text_len)
        return cls(cfg.name, cfg, transformer, vae, text, device, dtype, sampler_head=head, **precision)

    @property
    def has_sampler_head(self) -> bool:
        """Whether requests may use causal-driven stable sampling (sampler "head"; "auto" does)."""
        return self.sampler_head is not None

    def reserve(self, max_images: int) -> KVCache:
        """Allocate (or keep) the static KV cache for up to max_images images (2 rows each)."""
        rows = 2 * max_images
        if self._cache is None or not self._cache.fits(rows, self.dtype, self.device):
            self._cache = None  # free the old one first
            self._cache = KVCache.for_config(self.cfg, rows, self.dtype, self.device)
        return self._cache

    # ---- stages ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None
                       ) -> tuple[Conditioning, list[bool]]:
        """Encode each distinct text once; the unconditional branch is the negative prompt ("" = empty)."""
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        texts = list(dict.fromkeys([*prompts, *negative_prompts]))
        pos = {t: i for i, t in enumerate(texts)}
        enc = self.text_encoder.encode(texts)
        ip = torch.tensor([pos[p] for p in prompts], device=enc.pooled_BD.device)
        ineg = torch.tensor([pos[p] for p in negative_prompts], device=enc.pooled_BD.device)
        cond = Conditioning(enc.hidden_BTD[ip], enc.mask_BT[ip], enc.pooled_BD[ip], enc.pooled_BD[ineg])
        return cond, [enc.truncated[pos[p]] for p in prompts]

    def sample_tokens(self, cond: Conditioning, requests: Sequence[ImageRequest], *,
                      on_scale: Callable[[int, int], Collection[int] | None] | None = None,
                      on_logits=None, **probes) -> ScaleOutput:
        """The scale loop for len(requests) images; per-image parameters, generators and sampler.
        probes: on_head_logits= / on_commits= of autoregress.sample_scales (checks, debugging)."""
        requests = [self.with_defaults(r) for r in requests]
        params = RowParams.build([r.cfg for r in requests], [r.top_k for r in requests],
                                 [r.top_p for r in requests], [r.temperature for r in requests], self.device,
                                 self.cfg_stops(requests))
        gens = make_generators([r.seed for r in requests], self.device)
        cache = self.reserve(len(requests))
        head_images = [i for i, r in enumerate(requests) if r.sampler == "head"]
        return sample_scales(self.transformer, self.vae, cond, params, gens, cache, on_scale=on_scale,
                             on_logits=on_logits, head=self.sampler_head, head_images=head_images, **probes)

    def cfg_stops(self, requests: Sequence[ImageRequest]) -> list[int] | None:
        """Each request's first scale without guidance (S when it has none), or None when no
        request stops guidance; ValueError for an index outside 0 .. S."""
        S = self.cfg.num_scales
        for r in requests:
            if r.cfg_stop_scale is not None and not 0 <= r.cfg_stop_scale <= S:
                raise ValueError(f"cfg_stop_scale must be a scale index from 0 to {S} (model {self.name!r} has "
                                 f"{S} scales; {S} = guidance on every scale), got {r.cfg_stop_scale}")
        if all(r.cfg_stop_scale is None for r in requests):
            return None
        return [S if r.cfg_stop_scale is None else r.cfg_stop_scale for r in requests]

    def with_defaults(self, request: ImageRequest) -> ImageRequest:
        """request with every sampling field it leaves unset (None) filled: the model directory's
        recommendation (self.sampling), else OFFICIAL_SAMPLING; and its sampler resolved to "head"
        or "plain" (ValueError for "head" without a sampler head, or an unknown sampler)."""
        unset = {k: self.sampling.get(k, v) for k, v in OFFICIAL_SAMPLING.items() if getattr(request, k) is None}
        sampler = self.resolve_sampler(request.sampler)
        if sampler != request.sampler:
            unset["sampler"] = sampler
        return dataclasses.replace(request, **unset) if unset else request

    def resolve_sampler(self, sampler: str | None) -> str:
        """"head" or "plain": what a request's sampler (None = "auto") runs on this model."""
        return resolve_sampler(sampler, self.has_sampler_head, self.name)

    @torch.inference_mode()
    def decode(self, f_hat_NChw: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """VQ-VAE decode (float32 unless the VAE was cast) to images in [0, 1], [N, 3, H, W].

        chunk images per decoder call (None: self.decode_chunk, see decode_chunk_for): every image
        comes out bit-identical whatever the batch only where batched calls are proven to be.
        """
        chunk = self.decode_chunk if chunk is None else chunk
        if chunk < 1:
            raise ValueError(f"decode chunk must be >= 1, got {chunk}")
        fmt = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        parts = [self.vae.fhat_to_img(f_hat_NChw[i:i + chunk].contiguous(memory_format=fmt))
                 for i in range(0, f_hat_NChw.shape[0], chunk)]
        return torch.cat(parts) if parts else f_hat_NChw.new_zeros(0, 3, self.image_size, self.image_size)

    def generate(self, requests: Sequence[ImageRequest], *,
                 on_scale: Callable[[int, int], Collection[int] | None] | None = None) -> list[ImageResult]:
        """One model call for all requests; each image depends only on its own request."""
        requests = list(requests)
        if not requests:
            return []
        cond, truncated = self.encode_prompts([r.prompt for r in requests], [r.negative_prompt for r in requests])
        out = self.sample_tokens(cond, requests, on_scale=on_scale)
        keep = [i for i, c in enumerate(out.canceled) if not c]
        images = images_to_uint8(self.decode(out.f_hat_NChw[keep])) if keep else []
        by_row = dict(zip(keep, images))
        return [ImageResult(by_row.get(i), truncated[i], out.canceled[i]) for i in range(len(requests))]
