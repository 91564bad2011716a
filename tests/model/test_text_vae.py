"""CLIP wrapper (generated tokenizer, padding, truncation, pooled output) and the VQ-VAE decode."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from model.text import TextEncoder, byte_level_clip_tokenizer, random_clip_text_model, write_byte_level_clip_tokenizer


def test_generated_tokenizer_files_and_in_memory_tokenizer_agree(tmp_path):
    from_files = CLIPTokenizer.from_pretrained(write_byte_level_clip_tokenizer(tmp_path), local_files_only=True)
    in_memory = byte_level_clip_tokenizer()
    texts = ["A photo of a cat", "", "Ünïcode & symbols!? 123"]
    assert from_files(texts)["input_ids"] == in_memory(texts)["input_ids"]
    ids = in_memory(["ab"])["input_ids"][0]
    assert in_memory.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a", "b</w>", "<|endoftext|>"]


def test_encode_pads_to_77_and_reports_truncation():
    enc = TextEncoder(byte_level_clip_tokenizer(), random_clip_text_model(48, seed=0))
    out = enc.encode(["hi", "x" * 75, "x" * 76])  # 2 specials + 75 -> 77 tokens fits; 78 does not
    assert out.hidden_BTD.shape == (3, 77, 48) and out.pooled_BD.shape == (3, 48)
    assert out.mask_BT.sum(1).tolist() == [4, 77, 77]
    assert out.truncated == [False, False, True]
    # pooler_output is the hidden state at the end-of-text token
    torch.testing.assert_close(out.pooled_BD[0], out.hidden_BTD[0, 3])


def test_clip_folder_must_have_both_parts(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder/"):
        TextEncoder.from_folder(tmp_path)


def test_decode_gives_images_in_unit_range(tiny_pipe):
    f_hat = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))  # any size decodes, x16
    img = tiny_pipe.decode(f_hat)
    assert img.shape == (2, 3, 64, 64) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert torch.equal(img[1:], tiny_pipe.decode(f_hat[1:]))  # image by image: batch-independent
