"""Prompt adherence of a shapes model: classify each generated image's shape and colours, report accuracy.

    python -m training.adherence MODEL_DIR --prompts 28 --seeds 0,1,2 [--cfg 3 --top-k 0 --top-p 0]
    python -m training.adherence MODEL_DIR --seeds 100,101 --cfg 1.5,3,5 --top-k 0,20   # a sweep
    python -m training.adherence shapes --seeds 300,301 --guidance-stop-scale none,5,3   # fast guidance
    python -m training.adherence MODEL_DIR --sampler plain     # without the model's sampler head

The scorer is plain image analysis (no learned parts):
  background  the named colour nearest to most pixels of the 3-pixel border;
  object      pixels whose nearest named colour is not the background's, largest 4-connected
              component; its colour is the most common nearest named colour inside it;
  shape       a ring is the shape with a hole: if the component encloses pixels that are not its own
              (at least HOLE_FRACTION of its filled area), it is a ring, whatever the hole's size;
              otherwise the filled component is notched if it covers less than CONCAVE_SOLIDITY of
              its convex hull (then a star or a triangle, else a circle, square or triangle), and
              its bounding box gets each candidate's outline drawn into it (the outlines the
              dataset draws): the best intersection-over-union wins.
Prompts are the held-out combinations of training/shapes.py (never captions of training images), taken
round-robin over the five shapes (`held_out_targets`). Every (prompt, seed) pair is one image. Sampling parameters not given
on the command line come from the model directory's config.json ("sampling"), else the defaults
of model.pipeline (OFFICIAL_SAMPLING). Prints one JSON object; with several values for a sampling option (comma-separated)
it scores every combination and prints a JSON list, best (shape + colour accuracy) first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from model.request import SAMPLERS
from training.shapes import COLOUR_NAMES, COLOURS, HELD_OUT, SHAPES, caption, draw_outline

PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
BORDER = 3
MIN_OBJECT_PIXELS = 40
HOLE_FRACTION = 0.03    # enclosed non-object pixels / filled object area that make a ring (drawn: 0.30)
# filled area / convex-hull area below which a solid shape has notches: a star (or a dented triangle).
# Drawn: star 0.62-0.66, circle/square/triangle >= 0.93. The shapes model's VQ-VAE renders stars with blunt
# points: its decodes of the dataset's own tokens (600 drawings of training combinations, labels known)
# reach 0.70-0.85 for stars and 0.92-0.98 for circles; 0.88 lies between (docs/shapes.md, "Scorer").
CONCAVE_SOLIDITY = 0.88


@dataclass(frozen=True)
class Verdict:
    shape: str | None       # None: no object found
    colour: str | None
    background: str
    iou: float              # how well the best shape outline fits


def colour_labels(img_HW3: np.ndarray) -> np.ndarray:
    """Index of the nearest named colour for every pixel, [H, W] int."""
    d = ((img_HW3[:, :, None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _propagate(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of `mask` 4-connected to `seeds` (both bool [H, W])."""
    reach = seeds & mask
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= mask
        if np.array_equal(grown, reach):
            return reach
        reach = grown


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (all False if the mask is empty)."""
    best, rest = np.zeros_like(mask), mask.copy()
    while rest.sum() > best.sum():
        ys, xs = np.nonzero(rest)
        seed = np.zeros_like(mask)
        seed[ys[0], xs[0]] = True
        comp = _propagate(rest, seed)
        if comp.sum() > best.sum():
            best = comp
        rest &= ~comp
    return best


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """mask plus every pixel it encloses (not 4-connected to the image border outside the mask)."""
    border = np.zeros_like(mask)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    return ~_propagate(~mask, border)


def template(shape: str, h: int, w: int, supersample: int = 4) -> np.ndarray:
    """Bool [h, w] mask of `shape` filling an h x w box (anti-aliased, thresholded at half)."""
    img = Image.new("L", (w * supersample, h * supersample), 0)
    draw_outline(ImageDraw.Draw(img), shape, (0, 0, w * supersample, h * supersample), 255, 0)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX)) >= 128


def convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of a bool mask's pixels (as unit squares), by the monotone chain."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return 0.0
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)
    pts = sorted({(float(x), float(y + dy)) for y, l, r in zip(rows, left, right) for x in (l, r) for dy in (0, 1)})

    def half(points):
        chain: list[tuple[float, float]] = []
        for p in points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def classify(img_HW3: np.ndarray) -> Verdict:
    labels = colour_labels(img_HW3)
    border = np.concatenate([labels[:BORDER].ravel(), labels[-BORDER:].ravel(),
                             labels[:, :BORDER].ravel(), labels[:, -BORDER:].ravel()])
    bg = int(np.bincount(border, minlength=len(COLOUR_NAMES)).argmax())
    comp = largest_component(labels != bg)
    if comp.sum() < MIN_OBJECT_PIXELS:
        return Verdict(None, None, COLOUR_NAMES[bg], 0.0)
    colour = int(np.bincount(labels[comp], minlength=len(COLOUR_NAMES)).argmax())
    filled = fill_holes(comp)
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1

    def iou(shape: str, mask: np.ndarray) -> float:
        t, box = template(shape, y1 - y0, x1 - x0), mask[y0:y1, x0:x1]
        return float((t & box).sum() / max(1, (t | box).sum()))

    if (filled & ~comp).sum() >= HOLE_FRACTION * filled.sum():
        return Verdict("ring", COLOUR_NAMES[colour], COLOUR_NAMES[bg], iou("ring", comp))
    notched = filled.sum() < CONCAVE_SOLIDITY * convex_hull_area(filled)
    ious = {shape: iou(shape, filled) for shape in (("star", "triangle") if notched else ("circle", "square", "triangle"))}
    shape = max(ious, key=ious.get)
    return Verdict(shape, COLOUR_NAMES[colour], COLOUR_NAMES[bg], ious[shape])


def score(verdicts: list[Verdict], targets: list[tuple[str, str, str]]) -> dict:
    """Accuracies of verdicts against (shape, colour, background) targets."""
    n = max(1, len(targets))
    ok_shape = [v.shape == t[0] for v, t in zip(verdicts, targets)]
    ok_colour = [v.colour == t[1] for v, t in zip(verdicts, targets)]
    ok_bg = [v.background == t[2] for v, t in zip(verdicts, targets)]
    per_shape = {s: round(float(np.mean([o for o, t in zip(ok_shape, targets) if t[0] == s])), 4)
                 for s in SHAPES if any(t[0] == s for t in targets)}
    return {
        "images": len(targets),
        "shape_accuracy": round(sum(ok_shape) / n, 4),
        "object_colour_accuracy": round(sum(ok_colour) / n, 4),
        "background_colour_accuracy": round(sum(ok_bg) / n, 4),
        "colour_accuracy": round((sum(ok_colour) + sum(ok_bg)) / (2 * n), 4),
        "all_correct": round(sum(a and b and c for a, b, c in zip(ok_shape, ok_colour, ok_bg)) / n, 4),
        "shape_accuracy_by_shape": per_shape,
    }


def held_out_targets(m: int) -> list[tuple[str, str, str]]:
    """m held-out combinations, round-robin over the shapes (so a small m still covers every shape);
    past 28 the list repeats."""
    by_shape = [[c for c in HELD_OUT if c[0] == s] for s in SHAPES]
    order = [group[i] for i in range(max(map(len, by_shape))) for group in by_shape if i < len(group)]
    return [order[i % len(order)] for i in range(m)]


def evaluate(pipe, m: int, seeds: list[int], sampling: dict, batch: int = 8,
             sampler: str | None = None) -> tuple[dict, list]:
    """Generate every (held-out prompt, seed) image with pipe and score it; also return the rows.
    sampler: ImageRequest.sampler (None = "auto": the sampler head where the model has one)."""
    from model.pipeline import ImageRequest

    jobs = [(t, s) for t in held_out_targets(m) for s in seeds]
    rows, t0 = [], time.perf_counter()
    for i in range(0, len(jobs), batch):
        part = jobs[i:i + batch]
        results = pipe.generate([ImageRequest(caption(*t), seed=s, sampler=sampler, **sampling) for t, s in part])
        for (t, s), r in zip(part, results):
            rows.append((t, s, classify(r.image), r.image))
    report = score([r[2] for r in rows], [r[0] for r in rows])
    report["seconds_per_image"] = round((time.perf_counter() - t0) / max(1, len(jobs)), 4)
    return report, rows


SAMPLING_OPTIONS = ("cfg", "top_k", "top_p", "temperature", "cfg_stop_scale")


def samplings_from(model_dir: str, args: argparse.Namespace) -> list[dict]:
    """Every combination of the sampling values given (each option may list several), over the
    model directory's defaults."""
    import itertools

    from model.model_dir import sampling_defaults
    from model.pipeline import OFFICIAL_SAMPLING

    base = {**OFFICIAL_SAMPLING, **sampling_defaults(model_dir)}   # what an unset field would run with
    given = {k: getattr(args, k) for k in SAMPLING_OPTIONS if getattr(args, k) is not None}
    return [{**base, **dict(zip(given, values))} for values in itertools.product(*given.values())]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(" ", "").split(",") if x]


def _stops(text: str) -> list[int | None]:
    return [None if x == "none" else int(x) for x in text.replace(" ", "").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.adherence", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory or preset name (e.g. shapes)")
    ap.add_argument("--prompts", type=int, default=len(HELD_OUT), help=f"M held-out prompts (default {len(HELD_OUT)}: all)")
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--cfg", type=_floats, help="guidance scale(s), e.g. 3 or 1.5,3,5")
    ap.add_argument("--top-k", dest="top_k", type=_ints, help="top-k value(s) (0 = off)")
    ap.add_argument("--top-p", dest="top_p", type=_floats, help="top-p value(s) (0 = off)")
    ap.add_argument("--temperature", type=_floats, help="temperature(s)")
    ap.add_argument("--guidance-stop-scale", dest="cfg_stop_scale", type=_stops,
                    help="fast guidance: first scale(s) sampled without guidance, none = every scale guided")
    ap.add_argument("--sampler", choices=SAMPLERS, default="auto",
                    help="auto (default: the sampler head where the model has one), head, or plain")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda; default cpu)")
    ap.add_argument("--save", help="write every image as PNG into this folder (names: prompt index, seed)")
    return ap


def main(argv: list[str] | None = None) -> int:
    import torch

    from model.pipeline import StarPipeline

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = samplings_from(args.model, args)
    if args.save and len(settings) > 1:
        print("--save keeps the images of one setting; give one value per sampling option", file=sys.stderr)
        return 2
    pipe = StarPipeline.load(args.model, device=args.device)
    try:
        sampler = pipe.resolve_sampler(args.sampler)
    except ValueError as e:
        print(f"--sampler {args.sampler}: {e}", file=sys.stderr)
        return 2
    reports = []
    for sampling in settings:
        report, rows = evaluate(pipe, args.prompts, args.seeds, sampling, sampler=sampler)
        report.update(model=args.model, prompts=args.prompts, seeds=args.seeds, sampling=sampling,
                      sampler=sampler, device=args.device)
        reports.append(report)
    if len(reports) > 1:
        reports.sort(key=lambda r: -(r["shape_accuracy"] + r["colour_accuracy"]))
        print(json.dumps(reports, indent=1))
        return 0
    if args.save:
        from pathlib import Path

        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        for i, (t, s, v, img) in enumerate(rows):
            Image.fromarray(img).save(out / f"{i:03d}_{'_'.join(t)}_seed{s}_as_{v.shape}_{v.colour}_{v.background}.png")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
