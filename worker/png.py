"""PNG encoding with the generation parameters in text chunks, so an image can be reproduced
from itself: `Image.open(path).text` gives prompt, seed, size, ..., the sampler that ran (head or
plain) and a JSON `parameters` chunk.

The file is written here rather than by Pillow, for speed (docs/benchmarks.md, "PNG encoding",
measured with `python -m bench.png`): every row gets the same PNG filter, computed for the whole
image in a few numpy operations (Average by default: each byte minus the mean of its left and upper
neighbours), and the filtered rows are deflated by ISA-L (`isal`) at level 1. A 1024 px image then
costs 12-15 ms of one core; Pillow (a filter chosen per row, zlib level 6) took 150-370 ms, for
files from 4% larger to 15% smaller than these. numpy and ISA-L release the GIL, so the worker's
encode threads run in parallel. Chunks: IHDR, one tEXt per text (an iTXt, UTF-8, when the value
is not Latin-1), one IDAT, IEND.
"""
from __future__ import annotations

import json
import struct

import numpy as np
from isal import isal_zlib

TEXT_KEYS = ("prompt", "negative_prompt", "seed", "size", "guidance_scale", "top_k", "top_p",
             "temperature", "sampler", "guidance_stop_scale", "model")
SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTERS = {"none": 0, "sub": 1, "up": 2, "average": 3, "paeth": 4}   # PNG filter type per row


def png_text(params: dict, seed: int, model: str) -> dict[str, str]:
    """The text chunks of one image: its own seed (app.schemas.image_seed), and the whole request as JSON."""
    values = {**params, "seed": seed, "model": model}
    if values.get("guidance_stop_scale") is None:   # written only where fast guidance ran
        values.pop("guidance_stop_scale", None)
    text = {key: str(values[key]) for key in TEXT_KEYS if key in values}
    parameters = {key: values[key] for key in TEXT_KEYS if key in values}
    text["parameters"] = json.dumps(parameters, ensure_ascii=False, sort_keys=True)
    return text


def filter_rows(image: np.ndarray, kind: str = "average") -> np.ndarray:
    """uint8 [H, W, C] -> [H, 1 + W*C]: each row prefixed with its filter type and filtered by it
    (differences wrap modulo 256, as PNG defines them; what lies above the first row or left of
    the first pixel counts as zero)."""
    H, W, C = image.shape
    x = image.reshape(H, W * C)
    out = np.empty((H, W * C + 1), np.uint8)
    out[:, 0] = FILTERS[kind]
    f = out[:, 1:]
    if kind == "none":
        f[:] = x
        return out
    padded = np.zeros((H + 1, (W + 1) * C), np.uint8)      # a zero row above, a zero pixel to the left
    padded[1:, C:] = x
    a, b, c = padded[1:, :-C], padded[:-1, C:], padded[:-1, :-C]   # left, above, above-left
    if kind == "sub":
        pred = a
    elif kind == "up":
        pred = b
    elif kind == "average":                                  # floor((a + b) / 2) without overflow
        pred = (a & b) + ((a ^ b) >> 1)
    else:                                                    # paeth: the neighbour nearest a + b - c
        ai, bi, ci = (v.astype(np.int16) for v in (a, b, c))
        pa, pb, pc = np.abs(bi - ci), np.abs(ai - ci), np.abs(ai + bi - 2 * ci)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    np.subtract(x, pred, out=f)
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind)))


def text_chunk(key: str, value: str) -> bytes:
    """tEXt (Latin-1), or an uncompressed iTXt (UTF-8) when the value is not Latin-1."""
    keyword = key.encode("latin-1")
    if not 1 <= len(keyword) <= 79:
        raise ValueError(f"PNG text keyword must be 1-79 Latin-1 characters, got {key!r}")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(image: np.ndarray, text: dict[str, str], *, row_filter: str = "average", level: int = 1,
               compress=None) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (8-bit RGB) with the text chunks.

    row_filter: the PNG filter of every row (FILTERS); level: ISA-L deflate level 0-3; compress:
    any bytes -> zlib-stream function instead of ISA-L (bench/png.py compares them)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got shape {image.shape}")
    H, W, _ = image.shape
    rows = filter_rows(image, row_filter)
    idat = compress(rows) if compress is not None else isal_zlib.compress(rows, level)
    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)     # 8-bit truecolour, deflate, no interlace
    return b"".join([SIGNATURE, _chunk(b"IHDR", header), *(text_chunk(k, v) for k, v in text.items()),
                     _chunk(b"IDAT", idat), _chunk(b"IEND", b"")])
