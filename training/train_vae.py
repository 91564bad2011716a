"""VQ-VAE stages of `python -m training.train`, fitted to the shapes data (CPU-sized). Longer than
350 lines: the four stages and the fitted latent space they share read best in one place.

The VQ-VAE keeps VAR's layout and multi-scale residual quantizer; what is fitted rather than
learnt end to end is its latent space. With 32 base channels every GroupNorm at 64 and 128 px
normalises single channels (an instance norm), so a plain autoencoder has to rediscover absolute
colour from normalised contrast, which takes thousands of CPU steps. Instead:

1. latents    f = shapes.latent(spec) [16, 8, 8] of the N dataset images: per-cell coverage of each
              named colour (8 channels) and of the object in 8 cell regions (8 channels). Exact.
2. quantizer  VAR's multi-scale residual quantizer fitted to f: phi convs start as the identity,
              codebook rows are seeded from each scale's residuals, then codebook and phi are trained
              on ||f_hat - f||^2 with dead-code restarts. Gives every image's tokens per scale.
3. decoder    initialised so the residual path carries the colour coverages up to 128 px and
              `norm_out`/`conv_out` turn each present colour's (instance-normalised) coverage into
              a step, i.e. an exact palette colour (`init_decoder_`). That head stays fixed and the two
              channels of each colour stay tied; the rest is trained on quantized f_hat -> drawn
              image (L1 + MSE, plus a logistic loss on the colour channels) on 64 px crops aligned
              to the 16 px cells.
4. encoder    trained to regress f from the image (MSE), so `VQVAE.img_to_idx` gives the same kind of
              tokens; generation never runs the encoder.

`residual_quantize` is the computation of `VQVAE.img_to_idx` (same distance formula, area down /
bicubic up, phi per scale) starting from latents, with f_hat differentiable w.r.t. codebook and phi.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from model.vqvae import VQVAE
from training import shapes



def images_to_tensor(images_NHW3) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_NHW3)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target) + F.mse_loss(pred, target)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_lr_(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# ---- 1. latents ---------------------------------------------------------------------------------
def _latent_of(args: tuple[int, int]) -> np.ndarray:
    return shapes.latent(shapes.example_spec(*args))


def dataset_latents(seed: int, count: int, progress=None, workers: int = 1) -> torch.Tensor:
    """f of dataset images 0 .. count-1, [count, 16, 8, 8]; `workers` processes draw them (same result)."""
    jobs = [(seed, i) for i in range(count)]
    out = np.empty((count, shapes.LATENT_CHANNELS, shapes.IMAGE_SIZE // shapes.CELL, shapes.IMAGE_SIZE // shapes.CELL),
                   np.float32)
    if workers <= 1:
        results = map(_latent_of, jobs)
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_latent_of, jobs, chunksize=256)
    for i, f in enumerate(results):
        out[i] = f
        if progress is not None:
            progress.update(1)
    if workers > 1:
        pool.close()
        pool.join()
    return torch.from_numpy(out)


# ---- 2. quantizer ---------------------------------------------------------------------------------
def nearest_code(z_NChw: torch.Tensor, codebook_VC: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for every position, [N, h*w] (VQVAE.img_to_idx's formula)."""
    N, C, h, w = z_NChw.shape
    z_NC = z_NChw.permute(0, 2, 3, 1).reshape(-1, C)
    d = z_NC.square().sum(1, keepdim=True) + codebook_VC.square().sum(1)
    return torch.addmm(d, z_NC, codebook_VC.T, beta=1, alpha=-2).argmin(dim=1).view(N, h * w)


def residual_quantize(vae: VQVAE, f_NChw: torch.Tensor, on_scale=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(tokens per scale, f_hat); f_hat is differentiable w.r.t. the codebook and phi convs.

    on_scale(si, z_NChw) may fill codebook rows before scale si is quantized (seeding).
    """
    cfg = vae.cfg
    S, H = cfg.num_scales, f_NChw.shape[-1]
    N, C = f_NChw.shape[:2]
    f_rest, f_hat, idx_per_scale = f_NChw.detach().clone(), torch.zeros_like(f_NChw), []
    for si, pn in enumerate(cfg.patch_nums):
        z = f_rest if si == S - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
        if on_scale is not None:
            on_scale(si, z)
        idx = nearest_code(z, vae.quantize.embedding.weight.detach())
        h = vae.quantize.embedding(idx).transpose(1, 2).reshape(N, C, pn, pn)
        if si != S - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        h = vae.quantize.phi(si, S)(h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        idx_per_scale.append(idx)
    return idx_per_scale, f_hat


def _identity_conv_(conv: torch.nn.Conv2d, pairs) -> None:
    """Zero the conv, then copy input channel i to output channel o (centre tap) for (o, i) in pairs."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    k = conv.weight.shape[-1] // 2
    for o, i in pairs:
        conv.weight[o, i, k, k] = 1.0


@torch.no_grad()
def init_quantizer_(vae: VQVAE, f_NChw: torch.Tensor, g: torch.Generator) -> None:
    """phi convs = identity; codebook rows drawn from each scale's residuals in turn (a share per
    scale proportional to its side), so every row starts where data is."""
    for phi in vae.quantize.quant_resi.qresi_ls:
        _identity_conv_(phi, [(c, c) for c in range(phi.weight.shape[0])])
    cfg, emb = vae.cfg, vae.quantize.embedding.weight
    shares = torch.tensor(cfg.patch_nums, dtype=torch.float64)
    ends = (shares.cumsum(0) / shares.sum() * cfg.vocab_size).round().long().tolist()
    emb.zero_()
    filled = [0]

    def seed_rows(si: int, z_NChw: torch.Tensor) -> None:
        z_MC = z_NChw.permute(0, 2, 3, 1).reshape(-1, z_NChw.shape[1])
        want = ends[si] - filled[0]
        pick = torch.randint(z_MC.shape[0], (want,), generator=g)
        emb[filled[0]:ends[si]] = z_MC[pick] + 1e-3 * torch.randn(want, z_MC.shape[1], generator=g)
        filled[0] = ends[si]

    residual_quantize(vae, f_NChw, on_scale=seed_rows)


def quantizer_params(vae: VQVAE) -> list[torch.nn.Parameter]:
    return [vae.quantize.embedding.weight, *vae.quantize.quant_resi.parameters()]


def quantizer_step(vae: VQVAE, opt, f_NChw: torch.Tensor, g: torch.Generator, batch: int,
                   restart: bool) -> tuple[float, int]:
    """One step on a random batch of latents; with restart, unused rows jump to random residuals.
    Returns (loss, number of codebook rows the batch used)."""
    f = f_NChw[torch.randint(f_NChw.shape[0], (batch,), generator=g)]
    idx_per_scale, f_hat = residual_quantize(vae, f)
    loss = F.mse_loss(f_hat, f)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    used = torch.zeros(vae.cfg.vocab_size, dtype=torch.bool)
    for idx in idx_per_scale:
        used[idx.flatten()] = True
    if restart and not bool(used.all()):
        with torch.no_grad():
            residual = (f - f_hat).permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            dead = (~used).nonzero().flatten()
            pick = torch.randint(residual.shape[0], (dead.numel(),), generator=g)
            vae.quantize.embedding.weight[dead] = residual[pick]
    return float(loss.detach()), int(used.sum())


@torch.no_grad()
def tokens_and_fhat(vae: VQVAE, f_NChw: torch.Tensor, chunk: int | None = None,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [N, L] int64, f_hat [N, Cvae, h, w], code hits per scale [S, V]), on the CPU; the
    quantization runs on `device` (the VAE is moved there and back)."""
    cfg = vae.cfg
    toks, fhats = [], []
    hits = torch.zeros(cfg.num_scales, cfg.vocab_size)
    home = next(vae.parameters()).device
    chunk = chunk or (256 if torch.device(device).type == "cpu" else 4096)
    vae.to(device)
    try:
        with torch.no_grad():
            for i in range(0, f_NChw.shape[0], chunk):
                idx_per_scale, f_hat = residual_quantize(vae, f_NChw[i:i + chunk].to(device))
                for si, idx in enumerate(idx_per_scale):
                    hits[si] += torch.bincount(idx.flatten(), minlength=cfg.vocab_size).float().cpu()
                toks.append(torch.cat(idx_per_scale, dim=1).cpu())
                fhats.append(f_hat.cpu())
    finally:
        vae.to(home)
    return torch.cat(toks), torch.cat(fhats), hits


# ---- 3. decoder -----------------------------------------------------------------------------------
# Residual channels of the decoder (every level has at least 32): two tied copies of each signed
# colour map (object RGB signs * m, then -background RGB signs * m), m, the 8 region coverages.
OBJ, BG = (0, 2, 4), (6, 8, 10)                 # copy A of RGB component j; copy B is the next channel
FROM_LATENT = [(2 * j + b, j) for j in range(3) for b in (0, 1)] + [(6 + 2 * j + b, 3 + j) for j in range(3) for b in (0, 1)] \
    + [(12, 6)] + [(13 + r, 8 + r) for r in range(8)]
THROUGH = [(c, c) for c in range(21)]
TIED = [(c, c + 1) for c in (*OBJ, *BG)]
HEAD_K, HEAD_C, HEAD_G1, HEAD_G2, HEAD_L = 10.0, 2.0, 20.0, 10.0, 12.0


@torch.no_grad()
def init_decoder_(vae: VQVAE) -> None:
    """A decoder whose colours are exact from the start (geometry is then trained).

    After the decoder's last GroupNorm (one channel per group here, i.e. an instance norm) only the
    sign pattern of a map survives, and for an image with object mask m, IN(m) is +a (>= 1.36) on the
    object and -b (<= 0.73) on the background for objects up to 35% of the image. Channel j of the
    object map carries s_obj[j] * m, of the background map -s_bg[j] * m; the head computes per RGB
    component j
        K * (relu(x - 1) - relu(-x - 1))   of x = IN(object map j)   (only objects exceed 1)
      + C * clamp(L * y, -1, 1)            of y = IN(background map j)
    and the decoder's final clamp(-1, 1) turns it into s_obj[j] on the object and s_bg[j] elsewhere:
    the palette's 0/255 components exactly. relu is silu of a scaled input, the clamp the difference
    of two, so each map has two tied copies. Blocks start as the identity (zero-init branches and
    attention outputs); the residual path carries the latent maps up to 128 px (blocky)."""
    dec = vae.decoder
    for name, module in dec.named_modules():
        if name.endswith(("conv2", "proj_out")):
            module.weight.zero_()
            module.bias.zero_()
    _identity_conv_(dec.conv_in, FROM_LATENT)
    _identity_conv_(vae.post_quant_conv, [(c, c) for c in range(vae.cfg.vae_channels)])
    for level in dec.up:
        if hasattr(level, "upsample"):
            _identity_conv_(level.upsample.conv, THROUGH)
        if isinstance(level.block[0].nin_shortcut, torch.nn.Conv2d):
            _identity_conv_(level.block[0].nin_shortcut, THROUGH)
    gamma, beta, w, b = dec.norm_out.weight, dec.norm_out.bias, dec.conv_out.weight, dec.conv_out.bias
    for t in (gamma, beta, w, b):
        t.zero_()
    K, C, G1, G2, L = HEAD_K, HEAD_C, HEAD_G1, HEAD_G2, HEAD_L
    for j in range(3):
        o, g = OBJ[j], BG[j]
        gamma[o], beta[o], w[j, o, 1, 1] = G1, -G1, K / G1               # K relu(x - 1)
        gamma[o + 1], beta[o + 1], w[j, o + 1, 1, 1] = -G1, -G1, -K / G1  # -K relu(-x - 1)
        gamma[g], beta[g], w[j, g, 1, 1] = G2 * L, G2, C / G2            # C relu(L y + 1)
        gamma[g + 1], beta[g + 1], w[j, g + 1, 1, 1] = G2 * L, -G2, -C / G2  # -C relu(L y - 1)
        b[j] = -C


def tie_copies_(vae: VQVAE) -> None:
    """Keep the two copies of every signed map equal: average the rows of each layer writing into
    the decoder's residual stream."""
    dec = vae.decoder
    writers = [dec.conv_in] + [m for n, m in dec.named_modules()
                               if n.endswith(("conv2", "proj_out", "upsample.conv", "nin_shortcut"))
                               and isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in writers:
            for p in (conv.weight, conv.bias):
                for a, b in TIED:
                    p[a] = p[b] = (p[a] + p[b]) / 2


def coverage(spec: shapes.Spec) -> np.ndarray:
    """float32 [128, 128]: fraction of each pixel covered by the object."""
    m = shapes.object_mask(spec).astype(np.float32)
    s = shapes.SUPERSAMPLE
    return m.reshape(m.shape[0] // s, s, m.shape[1] // s, s).mean(axis=(1, 3))


def decoder_params(vae: VQVAE) -> list[torch.nn.Parameter]:
    """Everything but the colour head (norm_out, conv_out), which init_decoder_ sets and keeps."""
    head = {id(p) for p in (*vae.decoder.norm_out.parameters(), *vae.decoder.conv_out.parameters())}
    return [p for p in (*vae.decoder.parameters(), *vae.post_quant_conv.parameters()) if id(p) not in head]


def decode_with_maps(vae: VQVAE, f_NChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image before the final clamp, instance-normalised channels 0-11 entering the head)."""
    seen = {}
    hook = vae.decoder.norm_out.register_forward_hook(lambda m, inputs, out: seen.setdefault("h", inputs[0]))
    try:
        img = vae.decoder(vae.post_quant_conv(f_NChw))
    finally:
        hook.remove()
    return img, F.instance_norm(seen["h"][:, :12], eps=vae.decoder.norm_out.eps)


def map_targets(specs: list[shapes.Spec]) -> torch.Tensor:
    """What channels 0-11 should be after the instance norm: +-IN(true coverage), signed as in init_decoder_."""
    cov = torch.stack([torch.from_numpy(coverage(s)) for s in specs])[:, None]
    n = F.instance_norm(cov, eps=1e-6)
    signs = torch.zeros(len(specs), 12, 1, 1)
    for i, s in enumerate(specs):
        so, sb = shapes.colour_signs(s.colour), shapes.colour_signs(s.background)
        for j in range(3):
            signs[i, OBJ[j]] = signs[i, OBJ[j] + 1] = float(so[j])
            signs[i, BG[j]] = signs[i, BG[j] + 1] = -float(sb[j])
    return signs * n


def decoder_step(vae: VQVAE, opt, fhat_NChw: torch.Tensor, seed: int, g: torch.Generator, batch: int) -> float:
    """Full 128 px images (the instance norm sees whole images): the normalised maps regress their
    targets (dense gradients everywhere), plus L1 on the clamped image."""
    pick = torch.randint(fhat_NChw.shape[0], (batch,), generator=g).tolist()
    specs = [shapes.example_spec(seed, i) for i in pick]
    x = images_to_tensor(np.stack([shapes.render(s) for s in specs]))
    img, maps = decode_with_maps(vae, fhat_NChw[pick])
    loss = F.mse_loss(maps, map_targets(specs)) + 0.5 * F.l1_loss(img.clamp(-1, 1), x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder_params(vae), 1.0)
    opt.step()
    tie_copies_(vae)
    return float(loss.detach())


def aligned_crops(seed: int, indices: list[int], cells: int, g: torch.Generator, latents_NChw: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent crops [B, C, cells, cells], image crops [B, 3, 16*cells, 16*cells]) of dataset images,
    windows on the 16 px grid holding the shape's centre (the encoder is convolutional)."""
    lat, img = [], []
    n, px = latents_NChw.shape[-1], shapes.CELL
    for j, i in enumerate(indices):
        spec = shapes.example_spec(seed, i)
        x0, y0 = 0, 0
        if cells < n:
            cx, cy = int(spec.cx) // px, int(spec.cy) // px
            ox, oy = torch.randint(cells, (2,), generator=g).tolist()
            x0, y0 = min(max(0, cx - ox), n - cells), min(max(0, cy - oy), n - cells)
        lat.append(latents_NChw[j, :, y0:y0 + cells, x0:x0 + cells])
        img.append(images_to_tensor(shapes.render(spec)[None, y0 * px:(y0 + cells) * px, x0 * px:(x0 + cells) * px]))
    return torch.stack(lat), torch.cat(img)


# ---- 4. encoder -----------------------------------------------------------------------------------
def encoder_params(vae: VQVAE) -> list[torch.nn.Parameter]:
    return [*vae.encoder.parameters(), *vae.quant_conv.parameters()]


def encoder_step(vae: VQVAE, opt, f_NChw: torch.Tensor, seed: int, g: torch.Generator, batch: int,
                 cells: int) -> float:
    """Regress the fitted latents from (crops of) the drawn images."""
    pick = torch.randint(f_NChw.shape[0], (batch,), generator=g).tolist()
    f, x = aligned_crops(seed, pick, cells, g, f_NChw[pick])
    loss = F.mse_loss(vae.quant_conv(vae.encoder(x)), f)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(encoder_params(vae), 1.0)
    opt.step()
    return float(loss.detach())
