"""The shapes model: procedural data, scorer and training code (a few steps); the shipped model is
tested in test_shipped_model.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from model.config import StarConfig
from model.model_dir import ZOO, read_config, sampling_defaults, write_model_dir
from model.random_init import random_transformer, random_vae
from training import shapes
from training import train_vae as tv
from training.adherence import HELD_OUT, Verdict, classify, convex_hull_area, score
from training.train import RECIPES
from training.train_ar import teacher_forced_logits

SHIPPED = ZOO / "shapes"


# ---- data -----------------------------------------------------------------------------------------
def test_examples_are_a_pure_function_of_seed_and_index():
    a_img, a_cap = shapes.draw_example(3, 17)
    b_img, b_cap = shapes.draw_example(3, 17)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert a_img.shape == (128, 128, 3) and a_img.dtype == np.uint8
    assert not np.array_equal(a_img, shapes.draw_example(4, 17)[0])


def test_captions_name_the_drawn_shape_and_colours():
    spec = shapes.Spec("star", "yellow", "white", 64.0, 64.0, 30.0)
    assert spec.caption == "a yellow star on a white background"
    img = shapes.render(spec)
    assert tuple(img[0, 0]) == shapes.COLOURS["white"] and tuple(img[64, 64]) == shapes.COLOURS["yellow"]


def test_held_out_combinations_never_appear_in_training_but_their_words_do():
    assert len(shapes.HELD_OUT) == 28 and len(shapes.TRAIN_COMBOS) == 252
    seen = {shapes.example_spec(0, i).caption for i in range(2000)}
    assert not seen & set(shapes.HELD_OUT_PROMPTS)
    for s, c, b in shapes.HELD_OUT:  # every pair of attributes is still trained
        assert any(t[0] == s and t[1] == c for t in shapes.TRAIN_COMBOS)
        assert any(t[0] == s and t[2] == b for t in shapes.TRAIN_COMBOS)
        assert any(t[1] == c and t[2] == b for t in shapes.TRAIN_COMBOS)
    assert {x[0] for x in shapes.HELD_OUT} == set(shapes.SHAPES)


def test_tokenizer_gives_one_token_per_caption_word_and_reads_from_files(tmp_path):
    from transformers import CLIPTokenizer

    shapes.write_shapes_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for prompt in shapes.HELD_OUT_PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert len(ids) == 9 and ids == shapes.shapes_clip_tokenizer()(prompt)["input_ids"]
    assert tok.convert_ids_to_tokens(tok("a hexagon")["input_ids"])[2:4] == ["h", "e"]  # byte fallback


# ---- scorer ---------------------------------------------------------------------------------------
def _truth(count: int, seed: int = 11):
    specs = [shapes.example_spec(seed, i, tuple(shapes.all_combos())) for i in range(count)]
    return specs, [(s.shape, s.colour, s.background) for s in specs]


def test_scorer_is_exact_on_drawn_images():
    specs, targets = _truth(150)
    report = score([classify(shapes.render(s)) for s in specs], targets)
    assert report["shape_accuracy"] == report["colour_accuracy"] == report["all_correct"] == 1.0


def test_scorer_tolerates_blur_and_noise():
    specs, targets = _truth(100, seed=12)
    rng = np.random.default_rng(0)
    verdicts = []
    for s in specs:
        img = Image.fromarray(shapes.render(s)).filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(img).astype(np.float32) + rng.normal(0, 12, (128, 128, 3))
        verdicts.append(classify(noisy.clip(0, 255).astype(np.uint8)))
    report = score(verdicts, targets)
    assert report["colour_accuracy"] >= 0.98 and report["shape_accuracy"] >= 0.95, report


def _disc(inner: float, speck: int = 0) -> np.ndarray:
    """A red disc (radius 30) on blue with a blue hole of `inner` x its radius, or a green speck x speck px."""
    img = Image.new("RGB", (128, 128), (0, 0, 255))
    draw = ImageDraw.Draw(img)
    draw.ellipse((34, 30, 94, 90), fill=(255, 0, 0))
    if inner:
        r = 30 * inner
        draw.ellipse((64 - r, 60 - r, 64 + r, 60 + r), fill=(0, 0, 255))
    if speck:
        draw.rectangle((64, 60, 63 + speck, 59 + speck), fill=(0, 255, 0))
    return np.asarray(img)


def test_scorer_calls_any_shape_with_a_hole_a_ring_and_ignores_specks():
    for inner in (0.25, 0.4, shapes.RING_INNER, 0.75):
        assert classify(_disc(inner)).shape == "ring", inner
    assert classify(_disc(0.0)).shape == "circle"
    for speck in (2, 5):   # 4 and 25 px inside a ~2800 px disc: dirt, not a hole
        verdict = classify(_disc(0.0, speck))
        assert (verdict.shape, verdict.colour, verdict.background) == ("circle", "red", "blue"), speck


def test_convex_hull_area_of_pixel_masks():
    box = np.zeros((20, 30), bool)
    box[3:11, 5:25] = True
    assert convex_hull_area(box) == box.sum() == 160
    stairs = np.tril(np.ones((10, 10), bool))    # 55 px; hull corners (0,0) (1,0) (10,9) (10,10) (0,10)
    assert convex_hull_area(stairs) == 59.5
    assert convex_hull_area(np.zeros((5, 5), bool)) == 0.0


def _blunt_star(inner: float, blur: float) -> np.ndarray:
    """A yellow 5-point star (outer radius 30, inner `inner` x 30) on blue, its points rounded by a blur."""
    pts = [(64 + r * np.sin(k * np.pi / 5), 64 - r * np.cos(k * np.pi / 5))
           for k in range(10) for r in ((30.0, 30.0 * inner)[k % 2],)]
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur))) >= 128
    return np.where(soft[..., None], np.array([255, 255, 0], np.uint8), np.array([0, 0, 255], np.uint8))


def test_scorer_reads_blunt_stars_as_stars_and_rounded_convex_shapes_not():
    """Generated stars come out with rounded points and shallow notches; outline IoU alone called
    them circles. A notch test (area vs convex hull) decides star or not first."""
    for inner, blur in ((0.5, 0.0), (0.5, 3.0), (0.6, 2.0)):     # notch ratio 0.62, 0.77, 0.81
        assert classify(_blunt_star(inner, blur)).shape == "star", (inner, blur)
    rounded = Image.new("RGB", (128, 128), (0, 0, 255))
    ImageDraw.Draw(rounded).rounded_rectangle((34, 34, 94, 94), radius=12, fill=(255, 255, 0))
    assert classify(np.asarray(rounded)).shape == "square"
    assert classify(_disc(0.0)).shape == "circle"


def test_scorer_recognises_the_shipped_decoders_renderings_of_drawn_shapes():
    """The shipped VQ-VAE's decodes of the held-out combinations' own tokens (labels known): what the
    scorer must read in generated images. Measured on these 56 (2 per combination): shape 0.982; on
    168 (6 per combination): 0.976 (the outline-only scorer: 0.946)."""
    from safetensors.torch import load_file

    vae = random_vae(StarConfig.from_dict(read_config(SHIPPED)["arch"]))
    vae.load_state_dict({k: v.float() for k, v in load_file(SHIPPED / "vae.safetensors").items()})
    rng = np.random.default_rng(5)
    specs = [shapes.sample_spec(rng, c) for c in HELD_OUT for _ in range(2)]
    f = torch.from_numpy(np.stack([shapes.latent(s) for s in specs])).float()
    with torch.no_grad():
        _, f_hat = tv.residual_quantize(vae, f)
        img = vae.decoder(vae.post_quant_conv(f_hat)).clamp(-1, 1)
    images = ((img.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    report = score([classify(i) for i in images], [(s.shape, s.colour, s.background) for s in specs])
    assert report["colour_accuracy"] == 1.0 and report["shape_accuracy"] >= 0.95, report


def test_scorer_says_no_object_on_a_flat_image_and_counts_it_wrong():
    flat = np.full((128, 128, 3), shapes.COLOURS["green"], np.uint8)
    v = classify(flat)
    assert v == Verdict(None, None, "green", 0.0)
    assert score([v], [("circle", "red", "green")])["shape_accuracy"] == 0.0


# ---- training pieces --------------------------------------------------------------------------------
SMOKE = RECIPES["smoke"].arch


def test_latent_carries_colours_as_signs_of_the_object_coverage():
    spec = shapes.Spec("square", "red", "cyan", 64.0, 64.0, 40.0)
    f = shapes.latent(spec)
    m = f[6]
    assert f.shape == (16, 8, 8) and m.max() == 1.0 and m[0, 0] == 0.0
    np.testing.assert_array_equal(f[0:3], np.array([1, -1, -1])[:, None, None] * m)   # red: + - -
    np.testing.assert_array_equal(f[3:6], -np.array([-1, 1, 1])[:, None, None] * m)   # cyan: - + +
    np.testing.assert_allclose(f[8:12].mean(0), m, atol=1e-6)  # the quadrants average to the cell


def test_initial_decoder_draws_the_exact_palette_colours():
    vae = random_vae(RECIPES["shapes"].arch, seed=3)
    tv.init_decoder_(vae)
    specs, targets = _truth(12, seed=21)
    with torch.no_grad():
        img = vae.fhat_to_img(torch.stack([torch.from_numpy(shapes.latent(s)) for s in specs]))
    images = (img * 255).round().byte().permute(0, 2, 3, 1).numpy()
    report = score([classify(i) for i in images], targets)
    assert report["background_colour_accuracy"] == 1.0 and report["object_colour_accuracy"] >= 0.9, report
    assert set(map(tuple, images[:, 0, 0])) <= set(shapes.COLOURS.values())  # exact, not approximately


def test_residual_quantize_gives_the_tokens_of_vqvae_img_to_idx():
    vae = random_vae(SMOKE, seed=5)
    images, _ = shapes.batch(1, 0, 2)
    x = tv.images_to_tensor(images)
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(x))
        mine, f_hat = tv.residual_quantize(vae, f)
        theirs = vae.img_to_idx(x)
        fhat_loop = torch.zeros_like(f)
        for si, idx in enumerate(mine):
            vae.add_scale_(fhat_loop, idx, si)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    torch.testing.assert_close(f_hat, fhat_loop, rtol=1e-5, atol=1e-5)


def test_teacher_forced_logits_equal_the_model_forward_and_train():
    cfg = SMOKE
    model = random_transformer(cfg, seed=1)
    g = torch.Generator().manual_seed(0)
    pooled, ctx = torch.randn(3, cfg.text_dim, generator=g), torch.randn(3, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None].expand(3, -1) < 9
    f_in = torch.randn(3, cfg.L - 1, cfg.vae_channels, generator=g)
    with torch.no_grad():
        expected = model(pooled, model.text_kv(ctx, mask), f_in)
    model.requires_grad_(True)
    logits = teacher_forced_logits(model, pooled, ctx, mask, f_in)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.logsumexp(-1).mean().backward()
    assert model.blocks[0].cross_attn.mat_kv.weight.grad is not None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `--recipe smoke` run of every stage, exported: (work directory, model directory). Tests
    that change the work directory copy it first."""
    from training.train import main

    root = tmp_path_factory.mktemp("smoke")
    work, out = root / "work", root / "model"
    assert main(["--recipe", "smoke", "--work", str(work), "--export", str(out), "--no-progress"]) == 0
    return work, out


def test_smoke_training_runs_every_stage_resumes_and_exports_a_loadable_model(smoke_run, tmp_path):
    from model.pipeline import ImageRequest, StarPipeline
    from training.train import main

    work, out = tmp_path / "work", smoke_run[1]
    shutil.copytree(smoke_run[0], work)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"latents", "quant", "decoder", "encoder", "ar", "export"}
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    recipe = RECIPES["smoke"]
    assert sum(r["stage"] == "ar" and "step" in r for r in log) == recipe.ar_steps
    assert [r["steps_done"] for r in log if "steps_done" in r] == [recipe.ar_steps]
    # finished stages are skipped; more steps resume from the checkpoint
    assert main(["--recipe", "smoke", "--work", str(work), "--stages", "decoder,ar", "--no-progress",
                 "--set", f"ar_steps={recipe.ar_steps + 2}"]) == 0
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "ar" and "step" in r] == [*range(recipe.ar_steps), *range(recipe.ar_steps, recipe.ar_steps + 2)]
    assert sum(r["stage"] == "decoder" for r in log) == recipe.dec_steps
    config = read_config(out)
    assert config["sampling"] == dict(recipe.sampling) and config["arch"]["patch_nums"] == [1, 2, 4, 8]
    pipe = StarPipeline.load(str(out))
    result = pipe.generate([ImageRequest("a red circle on a blue background", seed=0, **sampling_defaults(out))])[0]
    assert result.image.shape == (128, 128, 3)


def test_latents_drawn_by_worker_processes_equal_one_process():
    one = tv.dataset_latents(3, 40)
    assert torch.equal(tv.dataset_latents(3, 40, workers=2), one)
    assert one.shape == (40, shapes.LATENT_CHANNELS, 8, 8)


def test_recipe_overrides_reach_the_architecture_and_reject_unknown_fields():
    from training.train import apply_overrides

    recipe = apply_overrides(RECIPES["smoke"], ["arch.depth=2", "ar_batch=16", "arch.patch_nums=[1,2,8]"])
    assert recipe.arch.depth == 2 and recipe.arch.embed_dim == 128 and recipe.arch.patch_nums == (1, 2, 8)
    assert recipe.ar_batch == 16 and recipe.arch.vae_ch == RECIPES["smoke"].arch.vae_ch
    with pytest.raises(SystemExit, match="unknown arch field"):
        apply_overrides(RECIPES["smoke"], ["arch.widht=3"])
    with pytest.raises(SystemExit, match="unknown recipe field"):
        apply_overrides(RECIPES["smoke"], ["ar_stepz=3"])


class StepClock:
    """A clock that moves `tick` seconds each time it is read: a time budget then always trains the
    same steps, however fast or busy the machine (the training code reads it a fixed number of times
    per step)."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budgeted_transformer_on_an_exported_vqvae(smoke_run, tmp_path, monkeypatch):
    """--from-model reuses an exported model's VQ-VAE (no VQ-VAE training), more images get tokens,
    and ar_seconds stops the transformer on the clock (a finished budget is not re-run)."""
    from safetensors.torch import load_file

    from training import train_ar
    from training.train import load_ckpt, main

    monkeypatch.setattr(train_ar, "CLOCK", StepClock(0.1))
    first = smoke_run[1]
    work, out = tmp_path / "w2", tmp_path / "second"
    args = ["--recipe", "smoke", "--work", str(work), "--from-model", str(first), "--stages", "latents,quant,ar,export",
            "--export", str(out), "--no-progress", "--workers", "2", "--note", "smoke run on a CPU",
            "--set", "images=24", "--set", "ar_seconds=1.5", "--set", "ar_steps=100000", "--set", "ckpt_every=1000"]
    assert main(args) == 0
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in log]
    assert "decoder" not in stages and "encoder" not in stages and "from_model" in stages
    assert load_ckpt(work / "tokens.pt")["tokens"].shape[0] == 24
    ar = load_ckpt(work / "ar.pt")
    steps = sum(r["stage"] == "ar" and "loss" in r for r in log)
    assert 3 <= steps == ar["step"] < 100000 and ar["elapsed"] >= 1.5
    lrs = [r["lr"] for r in log if r["stage"] == "ar" and "loss" in r]
    # the schedule followed the clock to its end: decaying step by step to about a tenth of the peak
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < max(lrs) and lrs[-1] < 0.2 * RECIPES["smoke"].ar_lr
    source = read_config(out)["source"]
    assert source["ar_steps_done"] == ar["step"] and source["note"] == "smoke run on a CPU"
    vae_a, vae_b = load_file(first / "vae.safetensors"), load_file(out / "vae.safetensors")
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    assert main(args) == 0  # the budget is spent: nothing more is trained
    assert load_ckpt(work / "ar.pt")["step"] == ar["step"]


def test_transformer_stage_can_start_from_earlier_weights(smoke_run, tmp_path):
    """--ar-init starts from another run's transformer and text encoder: with a zero learning rate
    the export is exactly those weights; a resumed run ignores it."""
    from safetensors.torch import load_file

    from training.train import main

    first_work, first = smoke_run
    out = tmp_path / "again"
    assert main(["--recipe", "smoke", "--work", str(tmp_path / "w2"), "--from-model", str(first), "--stages",
                 "latents,quant,ar,export", "--export", str(out), "--no-progress", "--ar-init",
                 str(first_work / "ar.pt"), "--set", "ar_lr=0", "--set", "ar_steps=2"]) == 0
    a, b = load_file(first / "transformer.safetensors"), load_file(out / "transformer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(first / "CLIP" / "text_encoder" / "model.safetensors"), load_file(out / "CLIP" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "w2" / "log.jsonl").read_text().splitlines()]
    assert [r["init"] for r in log if "init" in r] == [str(first_work / "ar.pt")]


def test_adherence_command_sweeps_sampling_settings(capsys):
    from training.adherence import main

    assert main(["shapes", "--prompts", "1", "--seeds", "0", "--cfg", "1,3", "--top-k", "0"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert sorted(r["sampling"]["cfg"] for r in reports) == [1.0, 3.0]
    assert all(r["images"] == 1 and r["sampling"]["top_k"] == 0 for r in reports)
    keys = [r["shape_accuracy"] + r["colour_accuracy"] for r in reports]
    assert keys == sorted(keys, reverse=True)
    assert main(["shapes", "--prompts", "1", "--seeds", "0", "--cfg", "1,3", "--save", "x"]) == 2


def test_model_dir_sampling_defaults_are_optional_and_checked(tmp_path):
    cfg = SMOKE
    text = shapes.shapes_text_encoder(cfg.text_dim, 1)
    tr, vae = random_transformer(cfg).state_dict(), random_vae(cfg).state_dict()
    write_model_dir(tmp_path / "old", cfg, tr, vae, text)
    assert sampling_defaults(tmp_path / "old") == {} and "sampling" not in read_config(tmp_path / "old")
    write_model_dir(tmp_path / "new", cfg, tr, vae, text, sampling={"cfg": 2.5, "top_k": 0})
    assert sampling_defaults(tmp_path / "new") == {"cfg": 2.5, "top_k": 0}
    with pytest.raises(ValueError, match="unknown sampling"):
        write_model_dir(tmp_path / "bad", cfg, tr, vae, text, sampling={"guidance": 2.5})
    assert sampling_defaults("tiny") == {}
