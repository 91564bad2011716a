"""Architecture config of STAR: one frozen dataclass and the named presets.

Everything a model's shape depends on lives here; derived values (width, heads, L, the token
offsets of every scale, the image size) are computed once in `__post_init__`. The optional
sampler head (causal-driven stable sampling) and its refinement rules are `SamplerHeadConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy

# Scale schedules of the released models (side of the token map at every scale).
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


RELEASE_SAMPLER_VERSION = "1024"


@dataclass(frozen=True)
class SamplerHeadConfig:
    """The sampler head's size and the rules of the refinement it drives (see docs/model.md).

    Scales whose index is >= from_scale are filled in several steps instead of one. The defaults
    are the `star-1024-sampler` release's rules (the official code's "1024" version).
    """

    blocks: int = 3                    # self-attention blocks of the head
    from_scale: int = 9                # first refined scale index
    steps: int = 8                     # refinement steps of a scale ...
    late_from_scale: int | None = 13   # ... except from this scale index on (None: never) ...
    late_steps: int = 15               # ... where there are this many
    base_head_steps: int = 5           # the first steps draw from the base head's logits ...
    base_head_until_scale: int = 13    # ... on scales below this index
    random_steps: int = 5              # the first steps commit positions of random priority

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerHeadConfig":
        """From config.json's "sampler_head": our field names, or an official-style block
        {"blocks", "from_scale", "version"}: version "1024" has the release rules, any other
        version the official code's other rules (the sampler head at every step, 8 steps)."""
        d = dict(d)
        version = str(d.pop("version", RELEASE_SAMPLER_VERSION))
        base = {} if version == RELEASE_SAMPLER_VERSION else {"base_head_steps": 0, "late_from_scale": None}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampler_head fields {unknown}; known: {sorted(names | {'version'})}")
        return cls(**{**base, **d})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def steps_at(self, si: int) -> int:
        """Refinement steps of scale si."""
        late = self.late_from_scale is not None and si >= self.late_from_scale
        return self.late_steps if late else self.steps

    def uses_base_head(self, si: int, step: int) -> bool:
        """Whether this step draws from the base head's logits (else from the sampler head's)."""
        return step < self.base_head_steps and si < self.base_head_until_scale

    def commits_random(self, step: int) -> bool:
        """Whether this step commits by random priority (else by confidence)."""
        return step < self.random_steps

    def validate(self, patch_nums: tuple[int, ...]) -> None:
        """Raise ValueError on rules no refinement can follow, e.g. a refined scale too small for
        its step schedule (the release refines only scales of 21x21 and more)."""
        if self.blocks < 1 or min(self.steps, self.late_steps) < 2:
            raise ValueError(f"sampler_head needs at least 1 block and 2 steps per refined scale: {self}")
        if min(self.base_head_steps, self.random_steps, self.base_head_until_scale) < 0:
            raise ValueError(f"sampler_head step and scale counts must be >= 0: {self}")
        if not 0 <= self.from_scale < len(patch_nums):
            raise ValueError(f"sampler_head.from_scale {self.from_scale} refines none of the {len(patch_nums)} scales")
        for si in range(self.from_scale, len(patch_nums)):
            n, steps = patch_nums[si] ** 2, self.steps_at(si)
            sizes = refine_step_sizes(n, steps)
            if min(sizes) < 1:
                raise ValueError(
                    f"sampler_head refines scale {si} ({patch_nums[si]}x{patch_nums[si]} = {n} positions) in "
                    f"{steps} steps, but the arccos schedule then gives step sizes {list(sizes)} (the last "
                    f"must be >= 1): refine from a later scale (from_scale) or use fewer steps")


def refine_step_sizes(n: int, steps: int) -> tuple[int, ...]:
    """How many positions each refinement step commits, for n positions in `steps` steps.

    v = arccos(linspace(1, 0, T)) / (pi/2); k = round(v / sum(v) * n) (half to even); a 0
    becomes 1; the last step takes the remainder (which can leave it <= 0 for a small n).
    """
    v = numpy.arccos(numpy.linspace(1, 0, steps)) / (numpy.pi / 2)
    k = numpy.round(v / v.sum() * n).astype(numpy.int64)
    k[k == 0] = 1
    k[-1] += n - k.sum()
    return tuple(int(x) for x in k)


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
    sampler_head: SamplerHeadConfig | None = None   # the optional sampler head and its rules
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
        if isinstance(self.sampler_head, dict):
            set_(self, "sampler_head", SamplerHeadConfig.from_dict(self.sampler_head))
        if self.sampler_head is not None:
            self.sampler_head.validate(patch_nums)

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
        if self.sampler_head is None:
            del d["sampler_head"]          # model directories without a head look as before
        else:
            d["sampler_head"] = self.sampler_head.to_dict()
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
    # The release's sampler head (3 blocks, refinement from scale 9 with the 1024 rules).
    "star-1024-sampler": StarConfig(name="star-1024-sampler", depth=30, patch_nums=PATCH_NUMS_1024,
                                    sampler_head=SamplerHeadConfig()),
    # tiny with a one-block head refining its last three scales, the last one with the late rules
    # (15 steps, sampler head only): tests of every refinement rule with random weights, cheaply.
    "tiny-sampler": StarConfig(name="tiny-sampler", depth=2, patch_nums=PATCH_NUMS_256, vocab_size=64,
                               vae_channels=8, vae_ch=32, text_dim=48,
                               sampler_head=SamplerHeadConfig(blocks=1, from_scale=7, late_from_scale=9,
                                                              base_head_until_scale=9)),
    # small with a head refining its last three scales (10x10, 13x13, 16x16: 77% of the tokens, as
    # the release refines 94% of its): the CPU benchmark of head vs plain sampling at 256 px.
    "small-sampler": StarConfig(name="small-sampler", depth=8, patch_nums=PATCH_NUMS_256,
                                sampler_head=SamplerHeadConfig(from_scale=7)),
}


def get_preset(name: str) -> StarConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None
