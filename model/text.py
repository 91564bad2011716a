"""CLIP text encoder wrapper, loaded only from a local folder (never from a hub at run time).

The folder is laid out like the official weights' `CLIP/` folder: `tokenizer/` (CLIPTokenizer
files) and `text_encoder/` (CLIPTextModel). Prompts are padded / truncated to 77 tokens; the
caller learns which prompts were truncated. Cross-attention reads `last_hidden_state` with the
attention mask; the start token reads `pooler_output`.

`write_byte_level_clip_tokenizer(dir)` writes a working CLIP tokenizer without any download (the
256 byte symbols, each also with `</w>`, the two special tokens and no merges): the `tiny` preset
and tests use it with a small random CLIPTextModel.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


@dataclass
class TextBatch:
    hidden_BTD: torch.Tensor   # last_hidden_state
    mask_BT: torch.Tensor      # bool, True = real token
    pooled_BD: torch.Tensor    # pooler_output
    truncated: list[bool]      # the prompt had more tokens than the encoder's length


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_clip_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [SOT, EOT]
    return {tok: i for i, tok in enumerate(tokens)}


def write_byte_level_clip_tokenizer(directory: str | Path) -> Path:
    """Write vocab.json + merges.txt (header only) loadable with CLIPTokenizer.from_pretrained."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(byte_level_clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return directory


def byte_level_clip_tokenizer():
    """The same tokenizer built in memory (no files)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_clip_vocab(), merges=[])


def random_clip_text_model(hidden: int, seed: int = 0, layers: int = 1, vocab_size: int = 514):
    """A small CLIPTextModel with deterministic random weights (ids: SOT = vocab-2, EOT = vocab-1)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    heads = 2 if hidden < 128 else hidden // 64
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.eval()


class TextEncoder:
    """Tokenizer + CLIPTextModel; `encode(prompts)` gives hidden states, mask, pooled, truncation flags."""

    def __init__(self, tokenizer, model, max_length: int = 77):
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval().requires_grad_(False), max_length

    @classmethod
    def from_folder(cls, clip_dir: str | Path, max_length: int = 77) -> "TextEncoder":
        from transformers import CLIPTextModel, CLIPTokenizer

        clip_dir = Path(clip_dir)
        for sub in ("tokenizer", "text_encoder"):
            if not (clip_dir / sub).is_dir():
                raise FileNotFoundError(f"CLIP folder {clip_dir} has no {sub}/ (expected tokenizer/ and text_encoder/)")
        tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer", local_files_only=True)
        model = CLIPTextModel.from_pretrained(clip_dir / "text_encoder", local_files_only=True)
        return cls(tokenizer, model, max_length)

    def save(self, clip_dir: str | Path) -> None:
        clip_dir = Path(clip_dir)
        self.tokenizer.save_pretrained(clip_dir / "tokenizer")
        self.model.save_pretrained(clip_dir / "text_encoder")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextBatch:
        probe = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length + 1)["input_ids"]
        lengths = [len(ids) for ids in probe]
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        return TextBatch(out.last_hidden_state, mask.bool(), out.pooler_output,
                         [n > self.max_length for n in lengths])
