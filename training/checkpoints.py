"""Checkpoints and the step loop shared by the training stages (training/train.py, train_ar.py):
resumable stage checkpoints in the work directory, the JSON-lines log, and the VQ-VAE of a stage."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from model.vqvae import VQVAE
from training import shapes


class Log:
    """Append-only JSON lines, flushed per line."""

    def __init__(self, path: Path):
        self.path, self.t0 = path, time.perf_counter()

    def write(self, **fields) -> None:
        fields["seconds"] = round(time.perf_counter() - self.t0, 3)
        with self.path.open("a") as f:
            f.write(json.dumps(fields) + "\n")


def load_ckpt(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_ckpt(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def run_loop(stage: str, work: Path, total: int, ckpt: dict | None, modules: dict, opt, step_fn, log: Log,
             every: int, progress: bool, extra: dict | Callable[[], dict] | None = None,
             stop: Callable[[int], bool] | None = None) -> int:
    """Steps ckpt['step'] .. total-1 of step_fn(step) -> (loss, lr, info); checkpoint every `every`.
    extra (or extra(), read at each save) adds fields to the checkpoint. stop(step), if given, ends the
    loop early after that step (checkpointed). Returns the steps done."""
    start = ckpt["step"] if ckpt else 0
    if ckpt:
        for name, module in modules.items():
            module.load_state_dict(ckpt[name])
        opt.load_state_dict(ckpt["opt"])

    def save(step: int) -> None:
        save_ckpt(work / f"{stage}.pt", {**{k: m.state_dict() for k, m in modules.items()},
                                         "opt": opt.state_dict(), "step": step,
                                         **((extra() if callable(extra) else extra) or {})})

    bar = tqdm(range(start, total), desc=stage, initial=start, total=total, disable=not progress, dynamic_ncols=True)
    for step in bar:
        loss, lr, info = step_fn(step)
        log.write(stage=stage, step=step, loss=round(loss, 6), lr=lr, **info)
        bar.set_postfix(loss=f"{loss:.4f}", **{k: v for k, v in info.items() if not isinstance(v, float)})
        ending = stop is not None and stop(step)
        if (step + 1) % every == 0 or step + 1 == total or ending:
            save(step + 1)
        if ending:
            bar.close()
            return step + 1
    if start >= total and not ckpt:
        save(total)
    return max(start, total)


def done(work: Path, stage: str, total: int) -> bool:
    ckpt = load_ckpt(work / f"{stage}.pt")
    return ckpt is not None and ckpt["step"] >= total



def new_vae(recipe) -> VQVAE:
    if recipe.arch.vae_channels != shapes.LATENT_CHANNELS:
        raise ValueError(f"the shapes latents have {shapes.LATENT_CHANNELS} channels, arch has {recipe.arch.vae_channels}")
    torch.manual_seed(recipe.seed)
    return VQVAE(recipe.arch)


def vae_from(work: Path, recipe, stage: str) -> VQVAE:
    vae = new_vae(recipe)
    vae.load_state_dict(load_ckpt(work / f"{stage}.pt")["vae"])
    return vae
