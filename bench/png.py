"""`python -m bench.png`: PNG encoding at 1024 px, CPU milliseconds of one core and bytes per image,
for the worker's encoder (worker/png.py: one PNG filter for all rows + ISA-L deflate; the default
is average+isal-1) at several filters and levels, against Pillow (a filter chosen per row + zlib)
and the standard library's zlib.

    python -m bench.png --json --out bench/results/png-1024.jsonl
    python -m bench.png --image photo.jpg --json      # also a file of your own (centre crop, resized)

Images (uint8, 1024 x 1024 x 3, all deterministic):
  shapes-vae      the shapes demo model's trained VQ-VAE decoder on the latent of a 1024 px scene
                  (model/zoo/shapes; real decoder output: flat colours, sharp anti-aliased edges)
  photo-stats     synthetic: random-phase noise with a 1/f amplitude spectrum per channel (the
                  second-order statistics of natural photographs), channels mixed; no real photo
                  ships with the project, so this stands in for photographic content
  random-decoder  the `tiny` preset's random-weight VQ-VAE on a random latent (what the
                  random-weight benchmarks produce: noise-like)
  noise           uniform random bytes (incompressible: the worst case)
  --image PATH    any image file, centre-cropped to a square and resized to 1024 (Lanczos)
CPU time is `time.thread_time()` around one encode (the cost to the worker's encode thread,
unaffected by other processes' load except through caches), best and median of --reps. Every
option's output is decoded by Pillow and compared with the input (`pixels_equal`), and its text
chunks read back (`text_ok`).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import zlib

import numpy as np

from bench.common import emit, machine_info

SIZE = 1024
TEXT = {"prompt": "a red fox standing in fresh snow at dawn, 35mm photograph", "seed": "1234", "size": "1024",
        "model": "star-1024", "parameters": '{"prompt": "a red fox ...", "seed": 1234}'}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.png", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="shapes-vae,photo-stats,random-decoder,noise",
                    help="comma list of built-in images (see above)")
    ap.add_argument("--image", action="append", default=[], help="an image file to add (repeatable)")
    ap.add_argument("--options", default=None, help="comma list of options to run (default: all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return ap.parse_args(argv)


def photo_stats(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(SIZE)[:, None], np.fft.rfftfreq(SIZE)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    chans = [np.fft.irfft2((rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f, s=(SIZE, SIZE))
             for _ in range(3)]
    x = np.stack(chans, -1) @ np.array([[1.0, 0.8, 0.6], [0.2, 1.0, 0.5], [0.1, 0.3, 1.0]])
    x = (x - x.min()) / (x.max() - x.min())
    return np.round(x * 255).astype(np.uint8)


def _decode_latent(pipe, latent_1Chw) -> np.ndarray:
    from model.pipeline import images_to_uint8

    return images_to_uint8(pipe.decode(latent_1Chw))[0]


def shapes_vae() -> np.ndarray:
    import torch

    from model import shapes
    from model.pipeline import StarPipeline

    pipe = StarPipeline.load(str(_zoo("shapes")))
    spec = shapes.sample_spec(np.random.default_rng(3), ("star", "yellow", "blue"), size=SIZE)
    return _decode_latent(pipe, torch.from_numpy(shapes.latent(spec, size=SIZE))[None])


def random_decoder() -> np.ndarray:
    import torch

    from model.pipeline import StarPipeline

    pipe = StarPipeline.load("tiny")
    side = SIZE // 16
    g = torch.Generator().manual_seed(0)
    return _decode_latent(pipe, torch.randn(1, pipe.cfg.vae_channels, side, side, generator=g))


def _zoo(name: str):
    from pathlib import Path

    import model

    return Path(model.__file__).parent / "zoo" / name


def from_file(path: str) -> np.ndarray:
    from PIL import Image

    im = Image.open(path).convert("RGB")
    side = min(im.size)
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.LANCZOS))


BUILT_IN = {"shapes-vae": shapes_vae, "photo-stats": photo_stats, "random-decoder": random_decoder,
            "noise": lambda: np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)}


def options() -> dict:
    """name -> (description, encode(image) -> bytes)."""
    from PIL import Image, PngImagePlugin

    from worker.png import encode_png

    def pillow(level):
        def run(img):
            info = PngImagePlugin.PngInfo()
            for k, v in TEXT.items():
                info.add_text(k, v)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", pnginfo=info, compress_level=level)
            return buf.getvalue()
        return run

    out = {f"pillow-{lv}": (f"Pillow {lv}: filter per row, zlib level {lv}", pillow(lv)) for lv in (6, 1)}
    for f in ("up", "sub", "average", "paeth", "none"):
        out[f"{f}+isal-1"] = (f"worker/png.py: {f} filter, ISA-L level 1",
                              lambda img, f=f: encode_png(img, TEXT, row_filter=f))
    for lv in (0, 2, 3):
        out[f"average+isal-{lv}"] = (f"worker/png.py: average filter, ISA-L level {lv}",
                                     lambda img, lv=lv: encode_png(img, TEXT, level=lv))
    out["average+zlib-1"] = ("average filter, stdlib zlib level 1",
                             lambda img: encode_png(img, TEXT, compress=lambda d: zlib.compress(d, 1)))
    out["average+zlib-rle"] = ("average filter, stdlib zlib level 1, Z_RLE strategy",
                               lambda img: encode_png(img, TEXT, compress=_zlib_rle))
    return out


def _zlib_rle(data) -> bytes:
    co = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    return co.compress(data) + co.flush()


def measure(name: str, img: np.ndarray, encode, reps: int) -> dict:
    from PIL import Image

    times, data = [], b""
    for _ in range(max(1, reps)):
        t0 = time.thread_time()
        data = encode(img)
        times.append(time.thread_time() - t0)
    decoded = Image.open(io.BytesIO(data))
    return {"cpu_ms": 1e3 * min(times), "cpu_ms_median": 1e3 * statistics.median(times), "bytes": len(data),
            "ratio_to_raw": len(data) / img.nbytes, "pixels_equal": bool(np.array_equal(np.asarray(decoded), img)),
            "text_ok": all(decoded.text.get(k) == v for k, v in TEXT.items())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = {n: BUILT_IN[n]() for n in args.images.split(",") if n}
    images.update({f"file:{p.rsplit('/', 1)[-1]}": from_file(p) for p in args.image})
    opts = options()
    chosen = args.options.split(",") if args.options else list(opts)
    out = open(args.out, "a", encoding="utf-8") if args.out else None
    recs = [{"kind": "machine", **machine_info()}]
    for img_name, img in images.items():
        for opt in chosen:
            desc, fn = opts[opt]
            recs.append({"kind": "png", "image": img_name, "option": opt, "what": desc, "size": SIZE,
                         **measure(opt, img, fn, args.reps)})
            emit(recs[-1], args.json)
            if out:
                emit(recs[-1], True, out)
    if out:
        emit(recs[0], True, out)
        out.close()
    return 0 if all(r.get("pixels_equal", True) and r.get("text_ok", True) for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
