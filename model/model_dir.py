"""The model directory: what `python -m model.convert` writes and `StarPipeline.load(dir)` reads.

    config.json               {"format": "star-model", "format_version": 1, "name", "arch": {...},
                               "transformer_dtype", "vae_dtype", "source": {...}}
    transformer.safetensors   transformer weights (bf16, fp16 or fp32), official key names; with the
                              sampler head's keys when "arch" has a "sampler_head" (its rules)
    vae.safetensors           VQ-VAE weights (float32 by default), official key names
    CLIP/tokenizer/           CLIPTokenizer files
    CLIP/text_encoder/        CLIPTextModel (save_pretrained layout)

config.json may also hold "sampling": the model's recommended per-image defaults (cfg, top_k, top_p,
temperature), and "example_prompts": a list of prompts the model draws well (the service shows them
to users); readers that do not know these keys ignore them. A bare name such as "shapes" that is not
an existing path resolves to a model shipped in `model/zoo/<name>/`.

safetensors files are memory-mapped and assigned onto a meta-device model with strict keys.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import StarConfig
from .weights import (ModelFileNotFoundError, WeightsError, WeightsMismatchError, build_transformer_and_head,
                      build_vae)

FORMAT, FORMAT_VERSION = "star-model", 1
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views of one private (copy-on-write) memory map: no copy.

    Falls back to safetensors' reader for a layout it cannot map (a dtype or offset it does not know).
    """
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=os.path.getsize(path))
    out = {}
    for key, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        start = 8 + n + info["data_offsets"][0]
        itemsize = dtype.itemsize if dtype is not None else 0
        if dtype is None or start % itemsize:
            return load_file(path)
        out[key] = torch.empty(0, dtype=dtype).set_(storage, start // itemsize, tuple(info["shape"]))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


ZOO = Path(__file__).resolve().parent / "zoo"
SAMPLING_KEYS = ("cfg", "top_k", "top_p", "temperature")


def resolve_model_path(spec: str | Path) -> Path:
    """spec as a path when it exists (or names a folder), else the shipped model `model/zoo/<spec>/`."""
    path = Path(spec)
    if not path.exists() and len(path.parts) == 1 and (ZOO / path.name / "config.json").is_file():
        return ZOO / path.name
    return path


def is_model_dir(path: str | Path) -> bool:
    return (resolve_model_path(path) / "config.json").is_file()


def _contiguous(sd: dict, dtype: torch.dtype) -> dict:
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def write_model_dir(out: str | Path, cfg: StarConfig, transformer_sd: dict, vae_sd: dict, text_encoder,
                    transformer_dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32,
                    source: dict | None = None, sampling: dict | None = None,
                    example_prompts: list[str] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(transformer_sd, transformer_dtype), out / "transformer.safetensors")
    save_file(_contiguous(vae_sd, vae_dtype), out / "vae.safetensors")
    text_encoder.save(out / "CLIP")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": cfg.name, "arch": cfg.to_dict(),
              "transformer_dtype": dtype_name(transformer_dtype), "vae_dtype": dtype_name(vae_dtype),
              "source": source or {}}
    if sampling:
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling defaults {unknown}; known: {list(SAMPLING_KEYS)}")
        config["sampling"] = dict(sampling)
    if example_prompts:
        config["example_prompts"] = list(example_prompts)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def read_config(path: str | Path) -> dict:
    path = resolve_model_path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFileNotFoundError(
            f"model directory {path} has no config.json (write one with `python -m model.convert`)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise WeightsError(f"{cfg_path} is not a STAR model directory config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{cfg_path}: format_version {config.get('format_version')} unsupported "
                           f"(this code reads {FORMAT_VERSION})")
    return config


def load_model_dir(path: str | Path):
    """(name, config, transformer, sampler head or None, vae, CLIP folder) from a model directory,
    weights as stored."""
    path = resolve_model_path(path)
    config = read_config(path)
    try:
        cfg = StarConfig.from_dict(config["arch"])
    except ValueError as e:   # WeightsMismatchError is a ValueError too
        raise WeightsMismatchError(f"{path / 'config.json'}: invalid \"arch\": {e}") from None
    files = {}
    for part in ("transformer", "vae"):
        f = path / f"{part}.safetensors"
        if not f.is_file():
            raise ModelFileNotFoundError(f"model directory {path} lacks {f.name}")
        files[part] = f
    weights = mmap_safetensors(files["transformer"])
    transformer, head = build_transformer_and_head(cfg, weights, f"{files['transformer']}")
    vae = build_vae(cfg, mmap_safetensors(files["vae"]), f"{files['vae']}")
    return config.get("name") or path.name, cfg, transformer, head, vae, path / "CLIP"


def sampling_defaults(spec: str | Path) -> dict:
    """The model directory's recommended sampling parameters ({} for presets and older directories)."""
    if not is_model_dir(spec):
        return {}
    sampling = read_config(spec).get("sampling") or {}
    return {k: sampling[k] for k in SAMPLING_KEYS if k in sampling}


def example_prompts(spec: str | Path) -> list[str]:
    """The prompts the model directory recommends to users ([] for presets and directories without)."""
    if not is_model_dir(spec):
        return []
    examples = read_config(spec).get("example_prompts") or []
    if not (isinstance(examples, list) and all(isinstance(e, str) and e.strip() for e in examples)):
        raise WeightsError(f"{resolve_model_path(spec) / 'config.json'}: example_prompts must be a list of "
                           f"non-empty strings, not {examples!r}")
    return list(examples)
