"""VAR's multi-scale residual VQ-VAE: tokens <-> f_hat <-> image, official key names.

f_hat is the sum over scales of phi(bicubic-upsampled codebook embeddings of that scale's
tokens); phi is one of 4 shared `0.5*h + 0.5*conv3x3(h)` convs, chosen per scale by where
si/(S-1) falls on the ticks linspace(1/12, 11/12, 4) (numpy argmin: the first on a tie).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import StarConfig
from .vae_blocks import Conv2d, Decoder, Encoder


class Phi(nn.Conv2d):
    def __init__(self, channels: int, resi_ratio: float = 0.5):
        super().__init__(channels, channels, 3, 1, 1)
        self.resi_ratio = resi_ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def phi_index(si: int, num_scales: int, num_phi: int = 4) -> int:
    """Which shared phi conv scale si uses (numpy linspace/argmin semantics of the official code)."""
    K = num_phi
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - at)).item())


class PhiList(nn.Module):
    def __init__(self, channels: int, num_phi: int = 4):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels) for _ in range(num_phi)])


class Quantizer(nn.Module):
    def __init__(self, cfg: StarConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.vae_channels)
        self.quant_resi = PhiList(cfg.vae_channels)
        # Training statistics of the official VAE; unused here, kept so its file loads key for key.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(cfg.num_scales, cfg.vocab_size))

    def phi(self, si: int, num_scales: int) -> Phi:
        return self.quant_resi.qresi_ls[phi_index(si, num_scales, len(self.quant_resi.qresi_ls))]


class VQVAE(nn.Module):
    def __init__(self, cfg: StarConfig):
        super().__init__()
        self.cfg = cfg
        Cv = cfg.vae_channels
        self.encoder = Encoder(cfg.vae_ch, cfg.vae_ch_mult, Cv)
        self.decoder = Decoder(cfg.vae_ch, cfg.vae_ch_mult, Cv)
        self.quantize = Quantizer(cfg)
        self.quant_conv = Conv2d(Cv, Cv, 3, 1, 1)
        self.post_quant_conv = Conv2d(Cv, Cv, 3, 1, 1)

    # ---- tokens -> f_hat (used by the sampling loop) ---------------------------------------------
    def add_scale_(self, f_hat_NChw: torch.Tensor, idx_Nl: torch.Tensor, si: int,
                   per_image: bool = True) -> torch.Tensor | None:
        """Add scale si's tokens to f_hat in place; return the next scale's input [N, l', Cvae] or None.
        per_image=False runs the phi conv on the whole batch at once (faster; rounding then depends on
        the batch size, which is fine for training data, not for serving)."""
        cfg = self.cfg
        S, pn, H = cfg.num_scales, cfg.patch_nums[si], cfg.patch_nums[-1]
        N = idx_Nl.shape[0]
        h_NChw = self.quantize.embedding(idx_Nl).to(f_hat_NChw.dtype).transpose(1, 2).reshape(N, -1, pn, pn)
        h_NChw = h_NChw.contiguous()  # the reshape may give channels-last strides, which convs round differently
        if si != S - 1:
            h_NChw = F.interpolate(h_NChw, size=(H, H), mode="bicubic")
        phi = self.quantize.phi(si, S)
        # one image at a time: a convolution rounds differently with the batch size, and an image
        # must not depend on its batch (the conv is tiny next to the transformer)
        f_hat_NChw.add_(torch.cat([phi(h_NChw[i:i + 1]) for i in range(N)]) if per_image else phi(h_NChw))
        if si == S - 1:
            return None
        pn_next = cfg.patch_nums[si + 1]
        f_next = F.interpolate(f_hat_NChw, size=(pn_next, pn_next), mode="area")
        return f_next.flatten(2).transpose(1, 2)

    def teacher_forcing_inputs(self, idx_per_scale: list[torch.Tensor], per_image: bool = True) -> torch.Tensor:
        """[N, L-1, Cvae]: for every scale si > 0 the input the sampling loop would have built
        (per_image: see add_scale_)."""
        cfg = self.cfg
        N = idx_per_scale[0].shape[0]
        f_hat = torch.zeros(N, cfg.vae_channels, cfg.patch_nums[-1], cfg.patch_nums[-1],
                            dtype=self.quantize.embedding.weight.dtype, device=idx_per_scale[0].device)
        nexts = [self.add_scale_(f_hat, idx, si, per_image) for si, idx in enumerate(idx_per_scale[:-1])]
        return torch.cat(nexts, dim=1)

    # ---- f_hat -> image ----------------------------------------------------------------------
    def fhat_to_img(self, f_hat_NChw: torch.Tensor) -> torch.Tensor:
        """Decode to images in [0, 1], [N, 3, H, W], in the VAE's dtype."""
        dtype = self.post_quant_conv.weight.dtype
        img = self.decoder(self.post_quant_conv(f_hat_NChw.to(dtype))).clamp_(-1, 1)
        return img.add_(1).mul_(0.5)

    # ---- image -> tokens (the VQ-VAE encoder; not used to generate) ----------------------------
    def img_to_idx(self, img_N3HW: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale token indices ([N, pn*pn] per scale) of images in [-1, 1]."""
        cfg = self.cfg
        f = self.quant_conv(self.encoder(img_N3HW))
        N, C, H, W = f.shape
        f_rest, codebook_VC = f.clone(), self.quantize.embedding.weight
        out, S = [], cfg.num_scales
        for si, pn in enumerate(cfg.patch_nums):
            z = f_rest if si == S - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            d = z_NC.square().sum(1, keepdim=True) + codebook_VC.square().sum(1)
            idx = torch.addmm(d, z_NC, codebook_VC.T, beta=1, alpha=-2).argmin(dim=1).view(N, pn * pn)
            h = self.quantize.embedding(idx).transpose(1, 2).reshape(N, C, pn, pn)
            if si != S - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            f_rest.sub_(self.quantize.phi(si, S)(h))
            out.append(idx)
        return out
