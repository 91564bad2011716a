"""Train a small STAR on the procedural shapes data (on a CPU, or a CUDA GPU) and export a model directory.

    python -m training.train [--recipe shapes] [--work artifacts/shapes-train] [--export model/zoo/shapes]
                          [--stages latents,quant,decoder,encoder,ar,export] [--set ar_steps=400 ...]
                          [--device cpu|cuda] [--workers N] [--from-model model/zoo/shapes]
                          [--ar-init weights.pt] [--transformer-dtype float16] [--note TEXT]
    python -m training.train --from-model model/zoo/shapes --stages latents,quant,head --export DIR \
                          [--set images=2000 --set head_steps=600]   # a sampler head on a frozen model
    python -m training.train --recipe shapes-gpu --from-model model/zoo/shapes --device cuda \
                          --stages latents,quant,ar,export --export model/zoo/shapes   # the shipped model

Stages (each resumable; a finished stage is skipped, an interrupted one continues from its last
checkpoint in --work; training/train_vae.py explains the VQ-VAE stages):
    latents  fitted VQ-VAE latents of the N dataset images          -> latents.pt
    quant    multi-scale residual quantizer fitted to the latents   -> quant.pt, tokens.pt
    decoder  VQ-VAE decoder trained on quantized f_hat -> image     -> decoder.pt
    encoder  VQ-VAE encoder trained to regress the latents          -> encoder.pt
    ar       STAR transformer + small CLIP text encoder, teacher-forced on the tokens with the
             block-causal mask, 10% of captions dropped to "" (for classifier-free guidance) -> ar.pt
    export   model directory (same format as converted official weights) with sampling defaults
    head     (with --from-model: the base model, frozen) the sampler head of causal-driven stable
             sampling, masked prediction over the refined scales (training/train_head.py) -> head.pt,
             then the model directory: the base model's files plus the head and its rules (head_rules)
Every optimisation step appends a line to <work>/log.jsonl: stage, step, loss, lr, seconds.

--from-model DIR starts from an exported model's VQ-VAE (its quantizer, decoder and encoder count as
trained), so only the data, the tokens and the transformer are (re)made: the way to retrain the
transformer on more images, or on a GPU (--device cuda), without touching the VQ-VAE.
--set ar_seconds=S trains the transformer for S seconds of wall clock instead of a step count (the
learning-rate schedule follows elapsed time; ar_steps becomes a cap); the steps taken are logged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import StarConfig
from model.model_dir import write_model_dir
from training import shapes
from training import train_vae as tv
from training.checkpoints import Log, done, load_ckpt, new_vae, run_loop, save_ckpt, vae_from
from training.train_ar import new_text_encoder, stage_ar

STAGES = ("latents", "quant", "decoder", "encoder", "ar", "export", "head")
MODEL_STAGES = STAGES[:-1]      # the default: a model from scratch (head: a sampler head on a trained one)


@dataclass(frozen=True)
class Recipe:
    arch: StarConfig
    text_layers: int = 2         # CLIPTextModel layers (its width is arch.text_dim)
    data_seed: int = 0
    images: int = 6000           # dataset images whose tokens the transformer learns
    rq_steps: int = 250
    rq_batch: int = 256
    rq_lr: float = 3e-3
    dec_steps: int = 900         # on full 128 px images (the decoder's instance norms see whole images)
    dec_batch: int = 4
    dec_lr: float = 4e-4
    enc_steps: int = 200
    enc_batch: int = 8
    enc_cells: int = 4           # the encoder trains on crops of 4x4 latent cells (64 px)
    enc_lr: float = 1e-3
    ar_steps: int = 1200
    ar_batch: int = 32
    ar_lr: float = 1e-3
    ar_wd: float = 0.05
    ar_seconds: float = 0.0      # > 0: train the transformer for this long (wall clock); ar_steps is a cap
    caption_dropout: float = 0.1
    ckpt_every: int = 50
    seed: int = 0                # initialisation and batch order
    sampling: tuple = (("cfg", 3.0), ("top_k", 0), ("top_p", 0.0), ("temperature", 1.0))
    # the sampler head (stage "head"): its refinement rules (SamplerHeadConfig fields; the 7 scales of
    # shapes: scales 4-6 refined, the last one with the late rules: 15 steps, sampler head only)
    head_rules: tuple = (("base_head_until_scale", 6), ("blocks", 1), ("from_scale", 4), ("late_from_scale", 6))
    head_steps: int = 600
    head_batch: int = 32
    head_lr: float = 1e-3

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arch"], d["sampling"], d["head_rules"] = self.arch.to_dict(), dict(self.sampling), dict(self.head_rules)
        return d


SHAPES_ARCH = StarConfig(name="shapes", depth=3, patch_nums=(1, 2, 3, 4, 5, 6, 8), vocab_size=512, vae_channels=16,
                         vae_ch=32, vae_ch_mult=(1, 1, 2, 2, 4), text_dim=64, num_classes=1)
RECIPES = {
    "shapes": Recipe(SHAPES_ARCH),
    # the shipped model: the VQ-VAE of "shapes" (use --from-model model/zoo/shapes), a depth-4
    # transformer trained for 260 s on one GPU (--device cuda) on 200k images
    "shapes-gpu": Recipe(SHAPES_ARCH.replace(depth=4), images=200_000, ar_batch=512, ar_lr=1e-3, ar_seconds=260.0,
                         ar_steps=1_000_000, ckpt_every=5000,
                         sampling=(("cfg", 1.5), ("top_k", 0), ("top_p", 0.0), ("temperature", 1.0))),
    # seconds, for tests: the same pipeline end to end on a few images
    "smoke": Recipe(SHAPES_ARCH.replace(name="shapes-smoke", depth=1, patch_nums=(1, 2, 4, 8), vocab_size=32,
                                        vae_ch_mult=(1, 1, 1, 1, 1), text_dim=32),
                    text_layers=1, images=8, rq_steps=3, rq_batch=8, dec_steps=2, dec_batch=2, enc_steps=2,
                    enc_batch=2, ar_steps=3, ar_batch=4, ckpt_every=2, head_steps=4, head_batch=4,
                    head_rules=(("base_head_until_scale", 3), ("blocks", 1), ("from_scale", 2), ("late_from_scale", 3))),
}


def stage_steps(recipe: Recipe) -> dict[str, int]:
    """The step count that finishes each trained stage."""
    return {"quant": recipe.rq_steps, "decoder": recipe.dec_steps, "encoder": recipe.enc_steps, "ar": recipe.ar_steps,
            "head": recipe.head_steps}


# ---- VQ-VAE stages ---------------------------------------------------------------------------------
def stage_latents(work: Path, recipe: Recipe, log: Log, progress: bool, workers: int = 1) -> None:
    with tqdm(total=recipe.images, desc="latents", disable=not progress, dynamic_ncols=True) as bar:
        f = tv.dataset_latents(recipe.data_seed, recipe.images, progress=bar, workers=workers)
    save_ckpt(work / "latents.pt", {"f": f})
    log.write(stage="latents", images=recipe.images)


def stage_quant(work: Path, recipe: Recipe, log: Log, progress: bool, device: str = "cpu") -> None:
    f = load_ckpt(work / "latents.pt")["f"]
    vae, ckpt = new_vae(recipe), load_ckpt(work / "quant.pt")
    g = torch.Generator().manual_seed(recipe.seed + 3)
    if ckpt is None:
        tv.init_quantizer_(vae, f, g)
    opt = torch.optim.Adam(tv.quantizer_params(vae), lr=recipe.rq_lr)

    def step_fn(step):
        lr = tv.lr_at(step, recipe.rq_steps, recipe.rq_lr, warmup=1)
        tv.set_lr_(opt, lr)
        restart = step % 20 == 0 and step < recipe.rq_steps * 3 // 4
        loss, used = tv.quantizer_step(vae, opt, f, g, recipe.rq_batch, restart)
        return loss, lr, {"codes_used": used}

    run_loop("quant", work, recipe.rq_steps, ckpt, {"vae": vae}, opt, step_fn, log, recipe.ckpt_every, progress)
    vae.load_state_dict(load_ckpt(work / "quant.pt")["vae"])
    tokens, f_hat, hits = tv.tokens_and_fhat(vae, f, device=device)
    vae.quantize.ema_vocab_hit_SV.copy_(hits / hits.sum(1, keepdim=True))
    save_ckpt(work / "quant.pt", {**load_ckpt(work / "quant.pt"), "vae": vae.state_dict()})
    save_ckpt(work / "tokens.pt", {"tokens": tokens, "f_hat": f_hat})
    rel = float((f_hat - f).square().mean() / f.var())
    log.write(stage="quant", relative_error=round(rel, 5), codes_used=int((hits.sum(0) > 0).sum()))


def _vae_stage(work: Path, recipe: Recipe, log: Log, progress: bool, stage: str, source: str, init_fn,
               params_fn, step, steps: int, lr_peak: float) -> None:
    vae, ckpt = vae_from(work, recipe, source), load_ckpt(work / f"{stage}.pt")
    if ckpt is None and init_fn is not None:
        init_fn(vae)
    opt = torch.optim.Adam(params_fn(vae), lr=lr_peak, betas=(0.9, 0.99))
    g = torch.Generator()

    def step_fn(i):
        lr = tv.lr_at(i, steps, lr_peak, warmup=max(1, steps // 20))
        tv.set_lr_(opt, lr)
        g.manual_seed(recipe.seed * 7919 + i)
        return step(vae, opt, g), lr, {}

    run_loop(stage, work, steps, ckpt, {"vae": vae}, opt, step_fn, log, recipe.ckpt_every, progress)


def stage_decoder(work: Path, recipe: Recipe, log: Log, progress: bool) -> None:
    f_hat = load_ckpt(work / "tokens.pt")["f_hat"]
    _vae_stage(work, recipe, log, progress, "decoder", "quant", tv.init_decoder_, tv.decoder_params,
               lambda vae, opt, g: tv.decoder_step(vae, opt, f_hat, recipe.data_seed, g, recipe.dec_batch),
               recipe.dec_steps, recipe.dec_lr)


def stage_encoder(work: Path, recipe: Recipe, log: Log, progress: bool) -> None:
    f = load_ckpt(work / "latents.pt")["f"]
    _vae_stage(work, recipe, log, progress, "encoder", "decoder", None, tv.encoder_params,
               lambda vae, opt, g: tv.encoder_step(vae, opt, f, recipe.data_seed, g, recipe.enc_batch, recipe.enc_cells),
               recipe.enc_steps, recipe.enc_lr)


def seed_from_model(work: Path, recipe: Recipe, model_dir: str) -> Path:
    """Write quant/decoder/encoder checkpoints holding an exported model's VQ-VAE, marked finished,
    so the next stages (tokens, transformer, export) build on it. Its VQ-VAE arch must be the recipe's."""
    from safetensors.torch import load_file

    from model.model_dir import read_config, resolve_model_path

    path = resolve_model_path(model_dir)
    theirs = StarConfig.from_dict(read_config(path)["arch"])
    keys = ("patch_nums", "vocab_size", "vae_channels", "vae_ch", "vae_ch_mult")
    diff = {k: (getattr(theirs, k), getattr(recipe.arch, k)) for k in keys if getattr(theirs, k) != getattr(recipe.arch, k)}
    if diff:
        raise SystemExit(f"--from-model {path}: its VQ-VAE differs from the recipe's (model, recipe): {diff}")
    vae = new_vae(recipe)
    vae.load_state_dict({k: v.float() for k, v in load_file(path / "vae.safetensors").items()})
    work.mkdir(parents=True, exist_ok=True)
    quant_opt = torch.optim.Adam(tv.quantizer_params(vae), lr=recipe.rq_lr).state_dict()
    for stage in ("quant", "decoder", "encoder"):
        total = stage_steps(recipe)[stage]
        save_ckpt(work / f"{stage}.pt", {"vae": vae.state_dict(), "opt": quant_opt if stage == "quant" else None,
                                         "step": total, "from_model": str(path)})
    return path


# ---- export -----------------------------------------------------------------------------------------
def stage_export(work: Path, recipe: Recipe, out: Path, log: Log, transformer_dtype=torch.float32,
                 note: str | None = None) -> Path:
    vae = vae_from(work, recipe, next(s for s in ("encoder", "decoder", "quant") if (work / f"{s}.pt").is_file()))
    ar = load_ckpt(work / "ar.pt")
    text = new_text_encoder(recipe)
    text.model.load_state_dict(ar["text"])
    source = {"trained_by": "python -m training.train", "recipe": recipe.to_dict(),
              "data": "training/shapes.py", "held_out": [list(c) for c in shapes.HELD_OUT]}
    if ar.get("step") is not None:
        source["ar_steps_done"] = int(ar["step"])
    if ar.get("elapsed") is not None:
        source["ar_seconds_done"] = float(ar["elapsed"])
    if note:
        source["note"] = note
    write_model_dir(out, recipe.arch, ar["transformer"], vae.state_dict(), text, transformer_dtype=transformer_dtype,
                    vae_dtype=torch.float32, source=source, sampling=dict(recipe.sampling),
                    example_prompts=list(shapes.EXAMPLE_PROMPTS))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.write(stage="export", out=str(out), bytes=size)
    return out


# ---- command line -----------------------------------------------------------------------------------
def apply_overrides(recipe: Recipe, items: list[str]) -> Recipe:
    """`key=value` pairs onto the recipe (values parsed as JSON, e.g. ar_steps=400, sampling=...);
    `arch.FIELD=value` changes the transformer's architecture (e.g. arch.depth=4)."""
    changes, arch = {}, {}
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"arch"}
    arch_fields = {f.name for f in dataclasses.fields(StarConfig)} - {"embed_dim", "num_heads"}
    for item in items:
        key, _, value = item.partition("=")
        if key.startswith("arch."):
            if key[5:] not in arch_fields:
                raise SystemExit(f"unknown arch field {key!r}; fields: {sorted(arch_fields)}")
            parsed = json.loads(value)
            arch[key[5:]] = tuple(parsed) if isinstance(parsed, list) else parsed
            continue
        if key not in fields:
            raise SystemExit(f"unknown recipe field {key!r}; fields: {sorted(fields)} or arch.<field>")
        parsed = json.loads(value)
        changes[key] = tuple(sorted(parsed.items())) if isinstance(parsed, dict) else parsed
    if arch:
        changes["arch"] = recipe.arch.replace(**arch)
    return dataclasses.replace(recipe, **changes)


def train(recipe: Recipe, work: Path, stages: tuple[str, ...] = MODEL_STAGES, export_to: Path | None = None,
          progress: bool = True, device: str = "cpu", workers: int = 1, from_model: str | None = None,
          note: str | None = None, ar_init: str | None = None,
          transformer_dtype: torch.dtype = torch.float32) -> Path | None:
    if "head" in stages and from_model is None:
        raise SystemExit("stage head trains a sampler head on a trained model: give it with --from-model DIR")
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1) + "\n")
    log = Log(work / "log.jsonl")
    if from_model is not None:
        log.write(stage="from_model", path=str(seed_from_model(work, recipe, from_model)))
    steps = stage_steps(recipe)
    runners = {"latents": partial(stage_latents, workers=workers), "quant": partial(stage_quant, device=device),
               "decoder": stage_decoder, "encoder": stage_encoder, "ar": partial(stage_ar, device=device, init=ar_init)}
    for stage in stages:
        if stage == "head":
            from training.train_head import stage_head

            return stage_head(work, recipe, str(from_model), export_to or work / "model-head", log, progress)
        if stage == "export":
            return stage_export(work, recipe, export_to or work / "model", log, transformer_dtype, note=note)
        finished = (work / "latents.pt").is_file() if stage == "latents" else done(work, stage, steps[stage])
        if stage == "ar" and recipe.ar_seconds > 0 and not finished:
            ckpt = load_ckpt(work / "ar.pt")
            finished = ckpt is not None and float(ckpt.get("elapsed", 0.0)) >= recipe.ar_seconds
        if stage == "quant":
            finished = finished and (work / "tokens.pt").is_file()
        if not finished:
            runners[stage](work, recipe, log, progress)
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="shapes", choices=sorted(RECIPES))
    ap.add_argument("--work", default="artifacts/shapes-train", help="checkpoints, tokens and log.jsonl")
    ap.add_argument("--export", default=None, help="model directory to write (default: <work>/model)")
    ap.add_argument("--stages", default=",".join(MODEL_STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", help="where the quantizer's tokens and the transformer stage run "
                    "(cpu, cuda, cuda:1; default cpu); the VQ-VAE stages run on the CPU")
    ap.add_argument("--workers", type=int, default=1, help="processes drawing the dataset's latents (default 1)")
    ap.add_argument("--from-model", default=None, metavar="DIR",
                    help="take the VQ-VAE of this exported model (skip training one); e.g. model/zoo/shapes; "
                    "stage head trains a sampler head on this model (frozen)")
    ap.add_argument("--ar-init", default=None, metavar="FILE",
                    help="start the transformer stage from these weights (fine-tuning): a file with 'transformer' "
                    "and 'text' state dicts, e.g. another run's ar.pt or bench/gpu_shapes.sh's weights-<name>.pt")
    ap.add_argument("--transformer-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="dtype of the exported transformer.safetensors (default float32; the pipeline computes "
                    "in its own dtype)")
    ap.add_argument("--note", default=None, help="free text stored in the exported config.json (source.note), "
                    "e.g. where and how long it was trained")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"unknown stages {unknown}; stages: {','.join(STAGES)}", file=sys.stderr)
        return 2
    recipe = apply_overrides(RECIPES[args.recipe], args.set)
    if args.device != "cpu":
        if not torch.cuda.is_available() and args.device.startswith("cuda"):
            print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu",
                  file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = train(recipe, Path(args.work), stages, Path(args.export) if args.export else None, not args.no_progress,
                device=args.device, workers=args.workers, from_model=args.from_model, note=args.note,
                ar_init=args.ar_init, transformer_dtype=getattr(torch, args.transformer_dtype))
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
