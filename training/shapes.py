"""Procedural "shapes" data: 128 px images of one flat shape on a flat background, with a caption.

    "a red circle on a blue background", "a yellow star on a white background", ...

Five shapes (circle, square, triangle, star, ring), eight named colours (the corners of the RGB
cube: red, green, blue, yellow, cyan, magenta, white, black), object colour != background
colour: 5 * 8 * 7 = 280 (shape, colour, background) combinations. HELD_OUT (28 of them) never occur
in training, so prompts built from them are "not used verbatim in training" while every word, and
every pair of (shape, colour), (shape, background) and (colour, background), still does.

Image i of a dataset is a pure function of (seed, i): `draw_example(seed, i)`. Shapes are drawn 4x
supersampled and box-filtered down, so edges are anti-aliased. The geometry of every shape lives
in `draw_outline` (normalised to its bounding box) and is shared with the scorer's templates.
`latent(spec)` is the VQ-VAE latent the shapes model is fitted to (see training/train_vae.py).

`write_shapes_clip_tokenizer(dir)` writes a CLIP BPE tokenizer (byte-level alphabet plus merges that
make each caption word one token); `shapes_text_encoder(...)` pairs it with a small CLIPTextModel.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "star", "ring")
# The eight corners of the RGB cube: every colour component is 0 or 255, so the shapes VQ-VAE can
# decode a colour exactly as three signs (see training/train_vae.py).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOUR_NAMES = tuple(COLOURS)
# What the service shows users as a start (config.json "example_prompts", GET /models, the web page):
# one per shape, each drawn right on 6 of 6 seeds by the shipped model (tests/training/test_shipped_model.py).
EXAMPLE_PROMPTS = ("a red circle on a blue background", "a yellow star on a black background",
                   "a green ring on a white background", "a red square on a white background",
                   "a white triangle on a red background")
RADIUS_RANGE = (20.0, 40.0)     # half the shape's extent, pixels
MARGIN = 4.0                    # the shape's bounding box stays this far from the border
RING_INNER = 0.55               # inner / outer radius of a ring
STAR_INNER = 0.5                # inner / outer radius of a star


@dataclass(frozen=True)
class Spec:
    """Everything an image depends on."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str, background: str) -> str:
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(shape, colour, background) of a prompt in the captions' grammar, "a {colour} {shape} on a
    {colour} background" (articles as `caption` writes them, colour != background), else None: the
    only prompts the shapes model was trained to draw."""
    words = text.split()
    if len(words) != 7 or words[3] != "on" or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS or colour == background:
        return None
    return (shape, colour, background) if caption(shape, colour, background) == " ".join(words) else None


def all_combos() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s in SHAPES for c in COLOUR_NAMES for b in COLOUR_NAMES if c != b]


def _held_out(combo: tuple[str, str, str]) -> bool:
    s, c, b = SHAPES.index(combo[0]), COLOUR_NAMES.index(combo[1]), COLOUR_NAMES.index(combo[2])
    return (s + c + 2 * b) % 10 == 0


HELD_OUT: tuple[tuple[str, str, str], ...] = tuple(x for x in all_combos() if _held_out(x))
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(x for x in all_combos() if not _held_out(x))
HELD_OUT_PROMPTS: tuple[str, ...] = tuple(caption(*x) for x in HELD_OUT)
TRAIN_PROMPTS: frozenset[str] = frozenset(caption(*x) for x in TRAIN_COMBOS)


# ---- geometry -----------------------------------------------------------------------------------
def _star_points(inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rr = 1.0 if k % 2 == 0 else inner
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return pts


def _triangle_points() -> list[tuple[float, float]]:
    return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]


def _to_box(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Rescale points to fill the unit box [0, 1]^2 (each axis separately)."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]


# Outlines in the unit box: ("polygon", points) or ("ellipse", inner-hole ratio or 0).
_OUTLINES = {
    "circle": ("ellipse", 0.0),
    "ring": ("ellipse", RING_INNER),
    "square": ("polygon", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]),
    "triangle": ("polygon", _to_box(_triangle_points())),
    "star": ("polygon", _to_box(_star_points(STAR_INNER))),
}
# Bounding-box half-width and half-height per unit radius (how big each shape is drawn).
_EXTENT = {"circle": (1.0, 1.0), "ring": (1.0, 1.0), "square": (0.82, 0.82),
           "triangle": (math.sqrt(3) / 2, 0.75), "star": (math.cos(math.pi / 10), (1 + math.cos(math.pi / 5)) / 2)}


def bounding_box(shape: str, cx: float, cy: float, radius: float) -> tuple[float, float, float, float]:
    hx, hy = _EXTENT[shape]
    return cx - hx * radius, cy - hy * radius, cx + hx * radius, cy + hy * radius


def draw_outline(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                 fill, hole_fill) -> None:
    """Draw `shape` filling `box` (x0, y0, x1, y1); a ring's hole is painted with hole_fill."""
    x0, y0, x1, y1 = box
    kind, arg = _OUTLINES[shape]
    if kind == "ellipse":
        draw.ellipse(box, fill=fill)
        if arg:
            mx, my = (x1 - x0) * (1 - arg) / 2, (y1 - y0) * (1 - arg) / 2
            draw.ellipse((x0 + mx, y0 + my, x1 - mx, y1 - my), fill=hole_fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in arg], fill=fill)


def render(spec: Spec, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """uint8 [size, size, 3] image of spec."""
    big = size * supersample
    bg = COLOURS[spec.background]
    img = Image.new("RGB", (big, big), bg)
    box = tuple(v * supersample for v in bounding_box(spec.shape, spec.cx, spec.cy, spec.radius))
    draw_outline(ImageDraw.Draw(img), spec.shape, box, COLOURS[spec.colour], bg)
    if supersample > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


# ---- the fitted latent space of the VQ-VAE -------------------------------------------------------
CELL = 16                       # pixels per latent position (the VQ-VAE downsamples 16x)
LATENT_CHANNELS = 16            # signed colour maps, object coverage, coverage of 8 cell regions


def object_mask(spec: Spec, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """bool [size*ss, size*ss]: where the object is (a ring's hole is not), at the supersampled grid."""
    big = size * supersample
    img = Image.new("L", (big, big), 0)
    box = tuple(v * supersample for v in bounding_box(spec.shape, spec.cx, spec.cy, spec.radius))
    draw_outline(ImageDraw.Draw(img), spec.shape, box, 255, 0)
    return np.asarray(img) >= 128


def cell_regions(n: int) -> np.ndarray:
    """[8, n, n] weights (each sums to 1) of 8 regions of a cell: quadrants TL, TR, BL, BR, then the
    triangles cut by its diagonals: top, right, bottom, left."""
    u = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(u, u)
    regions = [(x < .5) & (y < .5), (x >= .5) & (y < .5), (x < .5) & (y >= .5), (x >= .5) & (y >= .5),
               (y < x) & (y < 1 - x), (x > y) & (x > 1 - y), (y > x) & (y > 1 - x), (x < y) & (x < 1 - y)]
    w = np.stack(regions).astype(np.float32)
    return w / w.sum(axis=(1, 2), keepdims=True)


def colour_signs(name: str) -> np.ndarray:
    """+1 / -1 per RGB component (255 / 0) of a named colour."""
    return np.where(np.array(COLOURS[name]) > 127, 1.0, -1.0).astype(np.float32)


def latent(spec: Spec, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """float32 [16, size/16, size/16]: the VQ-VAE latent of the image of spec.

    With m the fraction of each cell the object covers: channels 0-2 = m * (RGB signs of the object
    colour), 3-5 = -m * (RGB signs of the background colour), 6 = m, 7 = 0, 8-15 = fraction of each
    cell region (cell_regions) the object covers. Colour lives only in signs of non-flat maps."""
    mask = object_mask(spec, size, supersample).astype(np.float32)
    n, cells = CELL * supersample, size // CELL
    blocks = mask.reshape(cells, n, cells, n)
    cover = blocks.mean(axis=(1, 3))
    out = np.zeros((LATENT_CHANNELS, cells, cells), np.float32)
    out[0:3] = colour_signs(spec.colour)[:, None, None] * cover
    out[3:6] = -colour_signs(spec.background)[:, None, None] * cover
    out[6] = cover
    out[8:] = np.einsum("iajb,rab->rij", blocks, cell_regions(n))
    return out


# ---- sampling -----------------------------------------------------------------------------------
def sample_spec(rng: np.random.Generator, combo: tuple[str, str, str], size: int = IMAGE_SIZE) -> Spec:
    shape = combo[0]
    scale = size / IMAGE_SIZE
    radius = float(rng.uniform(*RADIUS_RANGE)) * scale
    hx, hy = (e * radius for e in _EXTENT[shape])
    m = MARGIN * scale
    cx = float(rng.uniform(m + hx, size - m - hx))
    cy = float(rng.uniform(m + hy, size - m - hy))
    return Spec(shape, combo[1], combo[2], cx, cy, radius)


def example_spec(seed: int, index: int, combos=TRAIN_COMBOS) -> Spec:
    """Spec of image `index` of the dataset `seed` (a pure function of both)."""
    rng = np.random.default_rng([int(seed), int(index)])
    return sample_spec(rng, combos[int(rng.integers(len(combos)))])


def draw_example(seed: int, index: int, combos=TRAIN_COMBOS) -> tuple[np.ndarray, str]:
    spec = example_spec(seed, index, combos)
    return render(spec), spec.caption


def batch(seed: int, start: int, count: int, combos=TRAIN_COMBOS) -> tuple[np.ndarray, list[str]]:
    """Images [count, H, W, 3] uint8 and captions of examples start .. start + count - 1."""
    pairs = [draw_example(seed, i, combos) for i in range(start, start + count)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# ---- text: a CLIP tokenizer with one token per caption word --------------------------------------
WORDS = ("a", "an", "on", "background", *COLOUR_NAMES, *SHAPES)


def _learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges learned on `words` until each is one symbol (`word</w>`).

    Merges are learned BPE-style (most frequent pair first, ties by the pair itself), so applying
    them in rank order, as the tokenizer does, rebuilds every word whole.
    """
    from model.text import _bytes_to_unicode

    table = _bytes_to_unicode()
    seqs = []
    for word in words:
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        seqs.append(symbols)
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1
    return merges


def shapes_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges): the byte-level CLIP alphabet, the merged symbols, then the two special tokens."""
    from model.text import EOT, SOT, _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(WORDS)
    tokens += [a + b for a, b in merges]
    tokens += [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_shapes_clip_tokenizer(directory: str | Path) -> Path:
    """vocab.json + merges.txt, loadable with CLIPTokenizer.from_pretrained."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = shapes_clip_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def shapes_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = shapes_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges)


def shapes_text_encoder(hidden: int = 64, layers: int = 2, seed: int = 0, max_length: int = 77):
    """TextEncoder (model/text.py) with the shapes tokenizer and a small random CLIPTextModel."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.text import TextEncoder

    tokenizer = shapes_clip_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                            max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return TextEncoder(tokenizer, model, max_length)
