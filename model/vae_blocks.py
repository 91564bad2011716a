"""Convolutional encoder and decoder of VAR's VQ-VAE (the LDM vq-f16 layout), official key names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cpu_inference(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose CPU float32 inference always runs oneDNN's convolution.

    On CPU torch picks a convolution algorithm per call from the input's size: a batch of one
    small map (under 20480 values, e.g. the decoder's first convs at 16x16) goes to im2col + GEMM,
    a batch of several to oneDNN, so one image would round differently alone and in a batch. oneDNN
    computes every image of a batch the same way whatever the batch size, so with it the decoder
    is batch-invariant (tests/model/test_decode_batch.py). Training (grad on) and other devices
    take nn.Conv2d's own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_inference(x) and self.padding_mode == "zeros" and torch.backends.mkldnn.is_available():
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises a CPU batch image by image at inference.

    On channels-last maps of 1024 positions or more, torch's CPU kernel splits the sums of all the
    batch's positions between its threads, so with several threads an image's statistics round
    differently with the batch size; image by image the split is the same whatever the batch.
    (One thread, other devices and training take nn.GroupNorm's own path.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1 and _cpu_inference(x) and torch.get_num_threads() > 1:
            return torch.cat([super(GroupNorm, self).forward(x[i:i + 1]) for i in range(x.shape[0])])
        return super().forward(x)


def _norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2, self.conv2 = _norm(out_ch), Conv2d(out_ch, out_ch, 3, 1, 1)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = Conv2d(ch, 3 * ch, 1)
        self.proj_out = Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # B, HW, C
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Upsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], z_channels: int, num_res_blocks: int = 2):
        super().__init__()
        self.conv_in = Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in, n = ch, len(ch_mult)
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if i == n - 1:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != n - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], z_channels: int, num_res_blocks: int = 2):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in)
        up = []
        for i in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if i == n - 1:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample2x(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
