"""`python -m bench.agreement`: how closely a bf16 / fp16 pipeline follows float32 (same weights).

    python -m bench.agreement --preset small --device cuda --dtype bf16 --images 2 --json

Two checks, on the same requests (guidance 4.0):
  teacher-forced   both pipelines run the production scale loop (KV cache, guidance) on the
                   float32 run's tokens (the draw is replaced by those tokens), so every scale sees
                   the same prefix; per scale: how often the guided argmax agrees, whether the
                   float32 argmax is in the low-precision top 5, and the logits' error
  greedy           both pipelines sample greedily on their own; the fraction of equal tokens per
                   scale and the first scale where they part (errors compound after that)
Random-weight presets have small, nearly tied logits, so their agreement is a lower bound of what
trained weights give; the logits' error is the precision figure that carries over.
"""
from __future__ import annotations

import argparse
import sys

from bench.common import emit, machine_info

PROMPTS = ["a red fox standing in fresh snow at dawn", "a lighthouse on a cliff at dusk, 35mm photo",
           "a bowl of ramen, studio lighting", "an astronaut riding a horse, oil painting"]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16", help="the precision under test")
    ap.add_argument("--ref-dtype", default="float32")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also append the JSON line to this file")
    ap.add_argument("--plot", default=None, help="write a PNG plot of the agreement per scale")
    return ap.parse_args(argv)


def _requests(n: int, greedy: bool):
    from model.pipeline import ImageRequest

    extra = dict(top_k=1, top_p=0.0) if greedy else {}
    return [ImageRequest(PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" #{i}"), seed=i, **extra)
            for i in range(n)]


def _run(pipe, requests, forced=None):
    """Tokens per scale and the raw logits per scale; with `forced`, the draw returns those tokens."""
    import model.autoregress as ar

    logits, state = [], {"si": 0}

    def on_logits(si, lg):
        state["si"] = si
        logits.append(lg.float().cpu())

    saved = ar.sample_rows
    if forced is not None:
        ar.sample_rows = lambda lg, params, gens: forced[state["si"]].to(lg.device)
    try:
        cond, _ = pipe.encode_prompts([r.prompt for r in requests], [r.negative_prompt for r in requests])
        out = pipe.sample_tokens(cond, requests, on_logits=on_logits)
    finally:
        ar.sample_rows = saved
    return [t.cpu() for t in out.idx_per_scale], logits


def compare(ref_pipe, test_pipe, images: int) -> dict:
    from model.sampler import RowParams, guide

    requests = [ref_pipe.with_defaults(r) for r in _requests(images, greedy=False)]
    ref_idx, ref_logits = _run(ref_pipe, requests)
    _, test_logits = _run(test_pipe, requests, forced=ref_idx)
    params = RowParams.build([r.cfg for r in requests], [r.top_k for r in requests], [r.top_p for r in requests],
                             [r.temperature for r in requests], "cpu")
    S = len(ref_logits)
    per_scale, agree, top5, count, max_err, sq_err, sq_ref = [], 0, 0, 0, 0.0, 0.0, 0.0
    for si, (a, b) in enumerate(zip(ref_logits, test_logits)):
        t = params.guidance_t(si, S)
        ga, gb = guide(a, t), guide(b, t)
        top1 = ga.argmax(-1)
        same = (top1 == gb.argmax(-1))
        in5 = (gb.topk(min(5, gb.shape[-1]), dim=-1).indices == top1[..., None]).any(-1)
        err = (a - b).abs()
        per_scale.append({"scale": si, "tokens": int(top1.numel()), "top1_agreement": same.float().mean().item(),
                          "ref_top1_in_top5": in5.float().mean().item(), "logits_max_abs_err": err.max().item()})
        agree, top5, count = agree + int(same.sum()), top5 + int(in5.sum()), count + top1.numel()
        max_err = max(max_err, err.max().item())
        sq_err, sq_ref = sq_err + float((a - b).double().square().sum()), sq_ref + float(a.double().square().sum())
    greedy = _requests(images, greedy=True)
    g_ref, _ = _run(ref_pipe, greedy)
    g_test, _ = _run(test_pipe, greedy)
    g_scale = [(x == y).float().mean().item() for x, y in zip(g_ref, g_test)]
    parted = next((si for si, f in enumerate(g_scale) if f < 1.0), None)
    g_all = sum(int((x == y).sum()) for x, y in zip(g_ref, g_test)) / sum(x.numel() for x in g_ref)
    return {"teacher_forced_top1_agreement": agree / count, "teacher_forced_ref_top1_in_top5": top5 / count,
            "logits_max_abs_err": max_err, "logits_rel_rms_err": (sq_err / max(sq_ref, 1e-30)) ** 0.5,
            "greedy_token_agreement": g_all, "greedy_per_scale": g_scale, "greedy_first_divergent_scale": parted,
            "per_scale": per_scale, "tokens_compared": count}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.pipeline import StarPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    ref = StarPipeline.load(args.preset, device=args.device, dtype=args.ref_dtype)
    test = StarPipeline.load(args.preset, device=args.device, dtype=args.dtype)
    rec = {"kind": "agreement", "preset": args.preset, "device": str(test.device),
           "dtype": str(test.dtype).replace("torch.", ""), "ref_dtype": str(ref.dtype).replace("torch.", ""),
           "images": args.images, **compare(ref, test, args.images), "machine": machine_info(test.device)}
    emit(rec, args.json)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            emit(rec, True, f)
    if args.plot:
        from bench.plot import line_panels

        ps = rec["per_scale"]
        line_panels(args.plot, f"bench.agreement {rec['preset']} {rec['dtype']} vs {rec['ref_dtype']}", [
            {"title": "agreement per scale", "x_label": "scale", "series": {
                "teacher-forced top-1": [(p["scale"], p["top1_agreement"]) for p in ps],
                "greedy tokens": list(enumerate(rec["greedy_per_scale"]))}}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
