"""Check this implementation against outputs of the official STAR code: `python -m model.golden DIR`.

DIR is a case directory laid out like `shared/golden/star-official/<case>/`: config.json (the
architecture and sampling settings; `checkpoint` and `vae` paths relative to DIR) and
expected.safetensors (pre-encoded text of prompts A, B and the empty prompt; tokens, logits,
f_hat, images). Prompts A and B are run alone and together in one batch; every token must match,
logits / f_hat / images must agree within --atol. Exits 1 on any mismatch.

A case whose checkpoint has a sampler head (config.json "sampler_head": its rules) runs every
image with the head and also checks when and how each refined position was committed and the
head's logits. With "draw": "argmax" the run's random numbers are injected through the sampler's
one seam (`ImageRandom`): zero Gumbel noise (each draw takes the most likely token) and the
official run's random commit priorities (`P.priority.<si>.<step>`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .autoregress import Conditioning, ScaleOutput, sample_scales
from .kv_cache import KVCache
from .model_dir import parse_dtype
from .sampler import ImageRandom, RowParams, make_generators
from .weights import OfficialModel, WeightsError, load_official


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok


class InjectedRandom(ImageRandom):
    """The official run's random numbers for prompts P (A or B): argmax draws, stored priorities."""

    def __init__(self, exp: dict, prompts: list[str]):
        super().__init__([])
        self.exp, self.prompts = exp, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows) -> "InjectedRandom":
        return InjectedRandom(self.exp, [self.prompts[i] for i in rows])

    def gumbel(self, l, V, device, dtype, at_NlK=None) -> torch.Tensor:
        shape = (len(self.prompts), l, V) if at_NlK is None else at_NlK.shape
        return torch.zeros(shape, device=device, dtype=dtype)

    def priorities(self, si, step, l, device) -> torch.Tensor:
        keys = [f"{P}.priority.{si}.{step}" for P in self.prompts]
        missing = [k for k in keys if k not in self.exp]
        if missing:
            raise KeyError(f"expected.safetensors lacks the injected priorities {missing}")
        return torch.stack([self.exp[k] for k in keys]).to(device=device, dtype=torch.float32)


class Probes:
    """What a run saw besides its tokens: base and sampler-head logits, commit steps and kinds."""

    def __init__(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}
        self.head_logits: dict[tuple[int, int], torch.Tensor] = {}
        self.commits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def kwargs(self) -> dict:
        return dict(on_logits=lambda si, lg: self.logits.__setitem__(si, lg.float().cpu()),
                    on_head_logits=lambda si, step, lg: self.head_logits.__setitem__((si, step), lg.float().cpu()),
                    on_commits=lambda si, images, st, kind: self.commits.__setitem__(si, (st.cpu(), kind.cpu())))


def _run(m: OfficialModel, exp: dict, rows: list[int], case: dict, dtype: torch.dtype) -> tuple[ScaleOutput, Probes]:
    """Sample the prompts `rows` of the text tensors (row 2 = the empty prompt) in one batch."""
    tr = m.transformer
    dev = tr.pos_start.device
    hidden, mask, pooled = (exp[k].to(dev) for k in ("text.hidden", "text.mask", "text.pooled"))
    cond = Conditioning(hidden[rows].to(dtype), mask[rows], pooled[rows].to(dtype), pooled[[2] * len(rows)].to(dtype))
    n = len(rows)
    params = RowParams.build([case["cfg"]] * n, [case["top_k"]] * n, [case["top_p"]] * n, [1.0] * n, dev)
    if case.get("draw", "sample") == "argmax":
        rand = InjectedRandom(exp, ["AB"[r] for r in rows])
    else:
        rand = make_generators(list(range(n)), dev)
    probes = Probes()
    head_images = list(range(n)) if m.sampler_head is not None else []
    out = sample_scales(tr, m.vae, cond, params, rand, KVCache.for_config(tr.cfg, 2 * n, dtype, dev),
                        head=m.sampler_head, head_images=head_images, **probes.kwargs())
    out.idx_per_scale = [idx.cpu() for idx in out.idx_per_scale]
    out.f_hat_NChw = out.f_hat_NChw.cpu()
    return out, probes


def _compare_single(P: str, out: ScaleOutput, probes: Probes, exp: dict, atol: float, rep: Report,
                    patch_nums) -> list[str]:
    lines = []
    for si, pn in enumerate(patch_nums):
        got, want = out.idx_per_scale[si][0], exp[f"{P}.idx.{si}"]
        same = int((got == want).sum())
        key, err = f"{P}.logits_cond_uncond.{si}", ""
        if key in exp:
            both = torch.stack((probes.logits[si][0], probes.logits[si][len(out.canceled)]))
            e = (both - exp[key]).abs().max().item()
            err = f"{e:.2e}"
            rep.check(e <= atol, f"{P} scale {si}: logits error {e:.2e} > {atol}")
        rep.check(same == want.numel(), f"{P} scale {si}: {want.numel() - same} tokens differ")
        lines.append(f"  {P} scale {si:2d} pn {pn:2d}: tokens {same:5d}/{want.numel():<5d} logits max err {err or '-'}"
                     + _compare_commits(P, si, probes, exp, rep))
    lines += _compare_head_logits(P, probes, exp, atol, rep)
    if f"{P}.f_hat" in exp:
        e = (out.f_hat_NChw[0].float() - exp[f"{P}.f_hat"]).abs().max().item()
        rep.check(e <= atol, f"{P}: f_hat error {e:.2e} > {atol}")
        lines.append(f"  {P} f_hat max err {e:.2e}")
    return lines


def _compare_commits(P: str, si: int, probes: Probes, exp: dict, rep: Report) -> str:
    """Agreement of the commit step and kind of every position of a refined scale ('' elsewhere)."""
    if f"{P}.commit_step.{si}" not in exp:
        return ""
    if si not in probes.commits:
        rep.check(False, f"{P} scale {si}: the official run refined it, this one did not")
        return "  not refined"
    step, kind = (t[0] for t in probes.commits[si])
    same_step = int((step == exp[f"{P}.commit_step.{si}"]).sum())
    same_kind = int((kind == exp[f"{P}.commit_kind.{si}"]).sum())
    n = step.numel()
    rep.check(same_step == n and same_kind == n, f"{P} scale {si}: commit step differs at {n - same_step}, "
                                                 f"commit kind at {n - same_kind} positions")
    return f"  commit step {same_step}/{n} kind {same_kind}/{n}"


def _compare_head_logits(P: str, probes: Probes, exp: dict, atol: float, rep: Report) -> list[str]:
    lines = []
    prefix = f"{P}.head_logits_cond_uncond."
    for key in sorted(k for k in exp if k.startswith(prefix)):
        si, step = (int(x) for x in key[len(prefix):].split("."))
        if (si, step) not in probes.head_logits:
            rep.check(False, f"{P} scale {si} step {step}: the sampler head was not called")
            continue
        lg = probes.head_logits[(si, step)]
        e = (torch.stack((lg[0], lg[lg.shape[0] // 2])) - exp[key]).abs().max().item()
        rep.check(e <= atol, f"{P} scale {si} step {step}: sampler-head logits error {e:.2e} > {atol}")
        lines.append(f"  {P} sampler head logits, scale {si} step {step}: max err {e:.2e}")
    return lines


def _load_case(case_dir: Path, case: dict, dtype: torch.dtype, device: str, trust_pickle: bool,
               rep: Report) -> OfficialModel:
    """The case's model on `device` in `dtype` (the VQ-VAE in float32 or float64), its config.json
    read for what the checkpoint shapes cannot tell and checked against what they do."""
    overrides = {k: case[k] for k in ("rope_theta", "rope_norm", "logit_norm") if k in case}
    m = load_official(case_dir / case["checkpoint"], case_dir / case["vae"], name=case.get("name"),
                      trust_pickle=trust_pickle, patch_nums=tuple(case["patch_nums"]),
                      sampler_rules=case.get("sampler_head"), overrides=overrides)
    for key in ("depth", "embed_dim", "num_heads", "vocab_size", "vae_channels", "text_dim"):
        rep.check(key not in case or case[key] == getattr(m.cfg, key),
                  f"config.json says {key} {case.get(key)}, the checkpoint has {getattr(m.cfg, key)}")
    m.transformer.to(device=device, dtype=dtype)
    m.transformer.reset_buffers_(device)
    if m.sampler_head is not None:
        m.sampler_head.to(device=device, dtype=dtype)
    m.vae.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return m


def check_case(case_dir: str | Path, *, dtype: str = "float32", atol: float = 1e-4, decode: bool = True,
               trust_pickle: bool = False, device: str = "cpu", out=None) -> bool:
    out = out or sys.stdout
    case_dir = Path(case_dir)
    case = json.loads((case_dir / "config.json").read_text())
    torch_dtype = parse_dtype(dtype) if dtype != "float64" else torch.float64
    rep = Report()
    m = _load_case(case_dir, case, torch_dtype, device, trust_pickle, rep)
    cfg, vae = m.cfg, m.vae
    exp = load_file(case_dir / "expected.safetensors")
    head = f", sampler head {cfg.sampler_head}" if cfg.sampler_head else ""
    print(f"case {case.get('name', case_dir.name)}: {cfg.num_scales} scales {list(cfg.patch_nums)}, depth {cfg.depth}, "
          f"width {cfg.embed_dim}, dtype {dtype}, device {device}{head}", file=out)
    singles = {}
    for row, P in enumerate("AB"):
        singles[P], probes = _run(m, exp, [row], case, torch_dtype)
        print("\n".join(_compare_single(P, singles[P], probes, exp, atol, rep, cfg.patch_nums)), file=out)
        if decode and f"{P}.img" in exp:
            with torch.inference_mode():
                img = vae.fhat_to_img(singles[P].f_hat_NChw.to(device)).float().cpu()
            e = (img[0] - exp[f"{P}.img"]).abs().max().item()
            rep.check(e <= atol, f"{P}: image error {e:.2e} > {atol}")
            print(f"  {P} image max err {e:.2e}", file=out)
    batch, _ = _run(m, exp, [0, 1], case, torch_dtype)
    for row, P in enumerate("AB"):
        agree = [int((batch.idx_per_scale[si][row] == exp[f"{P}.idx.{si}"]).sum()) for si in range(cfg.num_scales)]
        total = [pn * pn for pn in cfg.patch_nums]
        rep.check(agree == total, f"{P} in the batch [A, B]: tokens differ at scales "
                                  f"{[si for si, (a, t) in enumerate(zip(agree, total)) if a != t]}")
        print(f"  {P} in batch [A, B]: tokens per scale {agree} of {total}", file=out)
    if "encode.image" in exp:
        with torch.inference_mode():
            idx = [i.cpu() for i in vae.img_to_idx(exp["encode.image"][None].to(vae.quantize.embedding.weight))]
        agree = [int((idx[si][0] == exp[f"encode.idx.{si}"]).sum()) for si in range(cfg.num_scales)]
        rep.check(agree == [pn * pn for pn in cfg.patch_nums], "VQ-VAE encoder tokens differ")
        print(f"  encoder tokens per scale {agree}", file=out)
    print("OK" if not rep.failures else "MISMATCH:\n  " + "\n  ".join(rep.failures), file=out)
    return not rep.failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.golden", description=__doc__.split("\n\n")[0])
    ap.add_argument("case_dir", nargs="+", help="golden case directory (config.json, checkpoint, expected.safetensors)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="transformer dtype (default float32)")
    ap.add_argument("--atol", type=float, default=1e-4, help="max abs error of logits, f_hat, image (default 1e-4)")
    ap.add_argument("--no-decode", action="store_true", help="skip the VQ-VAE decode check")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that need arbitrary code to load")
    args = ap.parse_args(argv)
    if args.device != "cpu":  # a correctness check: no TF32 shortcuts in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ok = True
    for d in args.case_dir:
        try:
            ok &= check_case(d, dtype=args.dtype, atol=args.atol, decode=not args.no_decode,
                             trust_pickle=args.trust_pickle, device=args.device)
        except (OSError, WeightsError, KeyError) as e:
            print(f"error: {d}: {e}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
