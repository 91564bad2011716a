"""Architecture config of STAR: one frozen dataclass and the named presets.

Everything a model's shape depends on lives here; derived values (width, heads, L, the token
offsets of every scale, the image size) are computed once in `__post_init__`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Scale schedules of the released models (side of the token map at every scale).
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclass(frozen=True)
class StarConfig:
    """Shapes and fixed hyper-parameters of one STAR model (transformer + VQ-VAE + text width)."""

    name: str
    depth: int
    patch_nums: tuple[int, ...]
    vocab_size: int = 4096          # V: VQ codebook size
    vae_channels: int = 32          # Cvae: VQ latent channels
    vae_ch: int = 160               # VQ-VAE base channels
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    text_dim: int = 1024            # D: text encoder width (the official demo builds STAR with 1024)
    text_len: int = 77              # T: CLIP tokens per prompt (padding / truncation length)
    num_classes: int = 1000         # rows of the (unused) class embedding kept by the checkpoints
    head_dim: int = 64
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_norm: float = 64.0         # every RoPE axis spans [0, rope_norm] whatever the map side
    logit_norm: bool = True         # LayerNorm (no affine) before head_logits
    # derived, filled by __post_init__
    embed_dim: int = field(default=0, compare=False)
    num_heads: int = field(default=0, compare=False)
    L: int = field(default=0, init=False, compare=False)
    begin_ends: tuple[tuple[int, int], ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        patch_nums = tuple(int(p) for p in self.patch_nums)
        if not patch_nums or any(p < 1 for p in patch_nums) or list(patch_nums) != sorted(set(patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing positive ints, got {self.patch_nums}")
        if patch_nums[0] != 1:
            raise ValueError(f"the first scale must be 1x1 (one start token), got {patch_nums[0]}")
        set_ = object.__setattr__
        set_(self, "patch_nums", patch_nums)
        set_(self, "vae_ch_mult", tuple(int(m) for m in self.vae_ch_mult))
        set_(self, "embed_dim", self.embed_dim or self.head_dim * self.depth)
        set_(self, "num_heads", self.num_heads or self.embed_dim // self.head_dim)
        if self.embed_dim != self.num_heads * self.head_dim:
            raise ValueError(f"embed_dim {self.embed_dim} != num_heads {self.num_heads} * head_dim {self.head_dim}")
        if self.head_dim % 4:
            raise ValueError("head_dim must be a multiple of 4 (two RoPE axes of complex pairs)")
        begin_ends, cur = [], 0
        for pn in patch_nums:
            begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        set_(self, "L", cur)
        set_(self, "begin_ends", tuple(begin_ends))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae_ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def replace(self, **changes) -> "StarConfig":
        """A copy with some fields changed (derived fields are recomputed)."""
        changes.setdefault("embed_dim", 0 if "depth" in changes else self.embed_dim)
        changes.setdefault("num_heads", 0 if ("depth" in changes or "embed_dim" in changes) else self.num_heads)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready architecture fields (what `config.json` of a model directory stores)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["patch_nums"] = list(self.patch_nums)
        d["vae_ch_mult"] = list(self.vae_ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StarConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown architecture fields {unknown}; known: {sorted(names)}")
        d = dict(d)
        d["patch_nums"] = tuple(d["patch_nums"])
        if "vae_ch_mult" in d:
            d["vae_ch_mult"] = tuple(d["vae_ch_mult"])
        return cls(**d)


PRESETS: dict[str, StarConfig] = {
    # The golden tiny256 architecture (depth 2, width 128, 2 heads, V 64, Cvae 8, VAE ch 32).
    "tiny": StarConfig(name="tiny", depth=2, patch_nums=PATCH_NUMS_256, vocab_size=64, vae_channels=8,
                       vae_ch=32, text_dim=48),
    # Depth 8 with the real VQ-VAE size, 256 px: CPU benchmarks.
    "small": StarConfig(name="small", depth=8, patch_nums=PATCH_NUMS_256),
    "star-256": StarConfig(name="star-256", depth=30, patch_nums=PATCH_NUMS_256),
    "star-256-d16": StarConfig(name="star-256-d16", depth=16, patch_nums=PATCH_NUMS_256),
    "star-512": StarConfig(name="star-512", depth=30, patch_nums=PATCH_NUMS_512),
    "star-1024": StarConfig(name="star-1024", depth=30, patch_nums=PATCH_NUMS_1024),
}


def get_preset(name: str) -> StarConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None
