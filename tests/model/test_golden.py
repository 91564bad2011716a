"""The model reproduces the official STAR code's outputs (tokens, logits, f_hat, image, encoder)."""
from __future__ import annotations

import io
import json

from safetensors.torch import load_file, save_file

from model import golden


def test_tiny256_matches_official_alone_and_in_a_batch(golden_dir, capsys):
    assert golden.main([str(golden_dir / "tiny256")]) == 0
    out = capsys.readouterr().out
    assert "A scale  9 pn 16: tokens   256/256" in out
    assert "B in batch [A, B]: tokens per scale [1, 4, 9, 16, 25, 36, 64, 100, 169, 256]" in out
    assert "A image max err" in out and "encoder tokens per scale" in out
    assert out.rstrip().endswith("OK")


def test_tiny1024_matches_official_alone_and_in_a_batch(golden_dir):
    out = io.StringIO()
    assert golden.check_case(golden_dir / "tiny1024", out=out), out.getvalue()
    assert "A scale 13 pn 64: tokens  4096/4096" in out.getvalue()


def test_checker_fails_on_a_wrong_expected_token(golden_dir, tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    config = json.loads((golden_dir / "tiny256" / "config.json").read_text())
    config["checkpoint"] = str(golden_dir / "tiny256" / config["checkpoint"])
    config["vae"] = str(golden_dir / "vae_tiny.pth")
    (case / "config.json").write_text(json.dumps(config))
    expected = load_file(golden_dir / "tiny256" / "expected.safetensors")
    expected["B.idx.4"][7] = (expected["B.idx.4"][7] + 1) % config["vocab_size"]
    expected = {k: v for k, v in expected.items() if not k.startswith("encode.")}  # skip the encoder: faster
    save_file(expected, case / "expected.safetensors")
    out = io.StringIO()
    assert not golden.check_case(case, decode=False, out=out)
    assert "B scale 4: 1 tokens differ" in out.getvalue()
    assert "B in the batch [A, B]: tokens differ at scales [4]" in out.getvalue()


def test_cli_exits_nonzero_for_a_missing_case(tmp_path, capsys):
    assert golden.main([str(tmp_path / "nope")]) != 0
    assert "nope" in capsys.readouterr().err
