"""worker/png.py's own PNG writer: every filter and deflate level decodes (Pillow, and the raw chunks
checked with the standard library's zlib) to exactly the input pixels, with the text chunks."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from worker.png import FILTERS, encode_png, png_text


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients, hard edges and noise (every filter's predictor gets used, wrap-around included)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 7) * 40], -1).astype(np.uint8)
    img[h // 2:] = rng.integers(0, 256, img[h // 2:].shape, dtype=np.uint8)
    return img


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        pos += 12 + n
    return out


@pytest.mark.parametrize("row_filter", sorted(FILTERS))
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_filter_and_level_decodes_to_the_same_pixels(row_filter, level):
    for shape in ((1, 1), (3, 5), (37, 64)):
        img = _image(*shape, seed=level)
        data = encode_png(img, {"prompt": "x"}, row_filter=row_filter, level=level)
        Image.open(io.BytesIO(data)).verify()                   # Pillow checks every chunk's CRC
        decoded = Image.open(io.BytesIO(data))
        assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(decoded), img), (row_filter, level, shape)


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """The PNG specification's reconstruction, byte by byte (a reference independent of numpy tricks)."""
    H, n = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((H, n), np.int64)
    for y in range(H):
        kind = rows[y, 0]
        for i in range(n):
            a = out[y, i - bpp] if i >= bpp else 0
            b = out[y - 1, i] if y else 0
            c = out[y - 1, i - bpp] if y and i >= bpp else 0
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)     # |p - a|, |p - b|, |p - c|
            paeth = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            pred = [0, a, b, (a + b) // 2, paeth]
            out[y, i] = (int(rows[y, 1 + i]) + pred[kind]) % 256
    return out.astype(np.uint8)


@pytest.mark.parametrize("row_filter", sorted(FILTERS))
def test_chunk_layout_and_rows_reconstructed_by_the_specification(row_filter):
    img = _image(9, 11)
    chunks = _chunks(encode_png(img, png_text({"prompt": "fox"}, 3, "tiny"), row_filter=row_filter))
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-2:] == [b"IDAT", b"IEND"] and set(kinds[1:-2]) == {b"tEXt"}
    assert chunks[0][1] == struct.pack(">IIBBBBB", 11, 9, 8, 2, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(chunks[-2][1]), np.uint8).reshape(9, 1 + 11 * 3)
    assert (rows[:, 0] == FILTERS[row_filter]).all()
    assert np.array_equal(_unfilter(rows, 3), img.reshape(9, -1))


def test_the_default_filter_is_average():
    rows = np.frombuffer(zlib.decompress(_chunks(encode_png(_image(4, 4), {}))[-2][1]), np.uint8).reshape(4, 13)
    assert (rows[:, 0] == FILTERS["average"]).all()


def test_text_is_latin1_text_or_utf8_itxt_and_reads_back():
    text = png_text({"prompt": "a fox, ünïcødé 🦊", "negative_prompt": "café", "size": 64}, 11, "tiny")
    data = encode_png(_image(8, 8), text)
    kinds = {body.split(b"\0")[0]: k for k, body in _chunks(data) if k in (b"tEXt", b"iTXt")}
    assert kinds[b"prompt"] == b"iTXt" and kinds[b"negative_prompt"] == b"tEXt" and kinds[b"parameters"] == b"iTXt"
    assert Image.open(io.BytesIO(data)).text == text


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        encode_png(np.zeros((4, 4), np.uint8), {})
    with pytest.raises(ValueError, match="keyword"):
        encode_png(np.zeros((2, 2, 3), np.uint8), {"k" * 80: "v"})
