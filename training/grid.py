"""A grid of example outputs with their prompts: `python -m training.grid` writes docs/examples.png.

    python -m training.grid [--model shapes] [--out docs/examples.png] [--prompts 12] [--seed 0] [--cols 4]

Prompts are the first held-out combinations (captions never used in training, see training/shapes.py),
spread over all five shapes; each cell is one image (seed fixed per cell) shown at 1.625x, its prompt
under it, and what the adherence scorer saw (a tick when shape and both colours match).
Sampling parameters come from the model directory's config.json.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from training.adherence import classify, held_out_targets
from training.shapes import caption

CELL, PAD, LABEL_H = 208, 8, 46


def make_grid(pipe, combos: list[tuple[str, str, str]], seed: int, sampling: dict, cols: int) -> Image.Image:
    from model.pipeline import ImageRequest

    results = pipe.generate([ImageRequest(caption(*c), seed=seed + i, **sampling) for i, c in enumerate(combos)])
    rows = (len(combos) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (CELL + PAD) + PAD, rows * (CELL + LABEL_H + PAD) + PAD), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for i, (combo, result) in enumerate(zip(combos, results)):
        x, y = PAD + (i % cols) * (CELL + PAD), PAD + (i // cols) * (CELL + LABEL_H + PAD)
        sheet.paste(Image.fromarray(result.image).resize((CELL, CELL), Image.Resampling.LANCZOS), (x, y))
        v = classify(result.image)
        ok = (v.shape, v.colour, v.background) == combo
        lines = textwrap.wrap(caption(*combo), 30)[:2]
        seen = "scorer: ok" if ok else f"scorer saw {v.colour} {v.shape}/{v.background}"
        for j, line in enumerate([*lines, f"seed {seed + i}, {seen}"]):
            draw.text((x, y + CELL + 2 + 14 * j), line, fill=(20, 20, 20) if j < len(lines) else
                      ((30, 120, 40) if ok else (170, 40, 40)), font=font)
    return sheet


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes", help="model directory or shipped model name (default shapes)")
    ap.add_argument("--out", default="docs/examples.png")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="seed of the first cell; cell i uses seed + i")
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> int:
    import torch

    from model.model_dir import sampling_defaults
    from model.pipeline import StarPipeline

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StarPipeline.load(args.model)
    sheet = make_grid(pipe, held_out_targets(min(args.prompts, 28)), args.seed, sampling_defaults(args.model), args.cols)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
