"""PNG encoding with the generation parameters in text chunks, so an image can be reproduced
from itself: `Image.open(path).text` gives prompt, seed, size, ... and a JSON `parameters` chunk.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, PngImagePlugin

TEXT_KEYS = ("prompt", "negative_prompt", "seed", "size", "guidance_scale", "top_k", "top_p",
             "temperature", "model")


def png_text(params: dict, seed: int, model: str) -> dict[str, str]:
    """The text chunks of one image: its own seed (app.schemas.image_seed), and the whole request as JSON."""
    values = {**params, "seed": seed, "model": model}
    text = {key: str(values[key]) for key in TEXT_KEYS if key in values}
    parameters = {key: values[key] for key in TEXT_KEYS if key in values}
    text["parameters"] = json.dumps(parameters, ensure_ascii=False, sort_keys=True)
    return text


def encode_png(image: np.ndarray, text: dict[str, str], compress_level: int = 6) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes with tEXt chunks (iTXt when a value is not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()
