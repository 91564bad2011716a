"""`python -m bench.sampler`: images per second, seconds per image, peak memory and FLOP efficiency
of the model pipeline at several batch sizes, with a stage breakdown.

    python -m bench.sampler --preset small --batch-sizes 1,8 --device cpu --dtype float32 --json
    python -m bench.sampler --preset star-1024 --batch-sizes auto --device cuda --dtype bf16 --json
    python -m bench.sampler --preset small-sampler --sampler plain,head --batch-sizes 1 --device cpu --json
    python -m bench.sampler --preset small --guidance-stop-scale none,7 --batch-sizes 1,8 --clock cpu --json

Per batch size, every rep runs the stages the worker runs, timed one by one: text encoding
(`encode_prompts`), token generation (`sample_tokens`: the scale loop), VQ decoding (`decode` and
the uint8 conversion) and PNG encoding (`worker.png.encode_png`, which the worker does off the
model's critical path). `s_per_image` / `images_per_s` cover text + tokens + decode (one
`generate` call); PNG encoding is reported beside them. The best rep is reported (the machine may
be shared), with the median next to it.

The same run times one large dense matmul in the same dtype on the same device (before the first
batch and after every batch size; the highest is used) as the machine's practical peak.
`token_stage_fraction_of_matmul_peak` = FLOPs of the token stage (bench/flops.py: every matmul of
the text encoder and the transformer, guidance rows included) / token stage seconds / that peak.

One extra run per batch size synchronises at every scale for the per-scale breakdown (transformer
step, sampling, VQ feature update, and the sampler head's refinement of a scale); it is not part of
the timed reps.

--sampler plain,head runs the sweep once per sampler (every image of a batch with that sampler;
the model must have a sampler head for "head") and then reports, per batch size, what the head
costs over plain sampling (`kind: "sampler_cost"`: seconds and FLOPs, head / plain).

--guidance-stop-scale none,7 likewise runs one sweep per fast-guidance setting (every image of a
batch with that stop scale; none = guidance on every scale) and reports, per sampler and batch
size, what it saves against `none` (`kind: "guidance_stop_cost"`: seconds and FLOPs, fast / full).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from bench.common import PeakMemory, emit, machine_info, matmul_peak, parse_int_list, set_clock, sync, timed

PROMPT = "benchmark image {i}: a red fox standing in fresh snow at dawn, 35mm photograph"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.sampler", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="model preset (random weights) or model directory")
    ap.add_argument("--sampler", default="auto",
                    help="comma list of auto, head, plain: the requests' sampler (one sweep each; default auto)")
    ap.add_argument("--guidance-stop-scale", default="none",
                    help="comma list of fast-guidance stop scales, none = guidance on every scale (one sweep each)")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (must match the preset)")
    ap.add_argument("--batch-sizes", default="1,2,4,8",
                    help="comma list, or 'auto': powers of two up to what fits in free CUDA memory (model/memory.py)")
    ap.add_argument("--until-oom", action="store_true",
                    help="after the list, keep doubling the batch until it does not fit")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", default="auto", help="transformer dtype: float32, bfloat16/bf16, float16/fp16, auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="cpu: time the stages and the matmul by this process's CPU time (CPU device only)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per batch size (best and median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size first")
    ap.add_argument("--no-decode", action="store_true", help="skip VQ decoding and PNG encoding")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-scale breakdown run")
    ap.add_argument("--compile", action="store_true", help="torch.compile the per-scale step (model/compile.py), "
                    "buckets = the batch sizes, compiled and warmed up before timing")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-dynamic", action="store_true",
                    help="shape-generic graphs (one per scale): less compile time")
    ap.add_argument("--memory-margin", type=float, default=0.1, help="free-memory fraction kept for --batch-sizes auto")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--plot", default=None, help="write a PNG plot (images/s and FLOP efficiency vs batch)")
    return ap.parse_args(argv)


def _requests(n: int, sampler: str = "auto", stop: int | None = None):
    from model.pipeline import ImageRequest

    return [ImageRequest(prompt=PROMPT.format(i=i), seed=1000 + i, sampler=sampler, cfg_stop_scale=stop)
            for i in range(n)]


def run_once(pipe, requests, decode: bool) -> dict:
    """One generation of `requests`, stage by stage; seconds per stage."""
    from model.pipeline import images_to_uint8
    from worker.png import encode_png

    dev = pipe.device
    (cond, _), t_text = timed(lambda: pipe.encode_prompts([r.prompt for r in requests],
                                                          [r.negative_prompt for r in requests]), dev)
    out, t_tok = timed(lambda: pipe.sample_tokens(cond, requests), dev)
    times = {"text_encode_s": t_text, "token_s": t_tok, "decode_s": 0.0, "png_s": 0.0}
    if decode:
        images, times["decode_s"] = timed(lambda: images_to_uint8(pipe.decode(out.f_hat_NChw)), dev)
        t0 = time.perf_counter()
        for img in images:
            encode_png(img, {"prompt": "benchmark"})
        times["png_s"] = time.perf_counter() - t0
    times["token_stage_s"] = t_text + t_tok
    times["generate_s"] = t_text + t_tok + times["decode_s"]
    return times


def scale_breakdown(pipe, requests) -> tuple[list[dict], float]:
    """Per-scale seconds of the transformer step, sampling (guidance + filtering + draw), the VQ
    feature update and the sampler head's refinement (head images on refined scales: its draws,
    commits and head calls), from one run that synchronises around each (wrappers applied from
    outside; a wrapped call inside another is counted once, by the outer one)."""
    import model.autoregress as ar

    dev, tr, vae = pipe.device, pipe.transformer, pipe.vae
    cfg = pipe.cfg
    rows = [{"scale": si, "side": pn, "tokens": pn * pn, "transformer_s": 0.0, "sampling_s": 0.0, "vq_s": 0.0,
             "refine_s": 0.0} for si, pn in enumerate(cfg.patch_nums)]
    state = {"si": 0, "inside": False}

    def wrap(fn, key, scale_of=None):
        def inner(*args, **kw):
            if state["inside"]:
                return fn(*args, **kw)
            si = scale_of(args) if scale_of else state["si"]
            state["si"], state["inside"] = si, True
            sync(dev)
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kw)
                sync(dev)
            finally:
                state["inside"] = False
            rows[si][key] += time.perf_counter() - t0
            return out
        return inner

    saved = {"guide": ar.guide, "sample_rows": ar.sample_rows, "refine": ar.Refinement.sample}
    had = {name: name in tr.__dict__ for name in ("scale_logits", "blocks_forward", "logits")}
    methods = {name: getattr(tr, name) for name in had}
    tr.scale_logits = wrap(methods["scale_logits"], "transformer_s", scale_of=lambda a: a[1])
    tr.blocks_forward = wrap(methods["blocks_forward"], "transformer_s", scale_of=lambda a: a[1])
    tr.logits = wrap(methods["logits"], "transformer_s")
    vae.add_scale_ = wrap(vae.add_scale_, "vq_s", scale_of=lambda a: a[2])
    ar.guide = wrap(saved["guide"], "sampling_s")
    ar.sample_rows = wrap(saved["sample_rows"], "sampling_s")
    ar.Refinement.sample = wrap(saved["refine"], "refine_s", scale_of=lambda a: a[1])
    try:
        cond, _ = pipe.encode_prompts([r.prompt for r in requests], [r.negative_prompt for r in requests])
        _, total = timed(lambda: pipe.sample_tokens(cond, requests), dev)
    finally:
        ar.guide, ar.sample_rows, ar.Refinement.sample = saved["guide"], saved["sample_rows"], saved["refine"]
        del vae.add_scale_
        for name, was_set in had.items():
            if was_set:
                setattr(tr, name, methods[name])
            else:
                delattr(tr, name)
    return rows, total


def bench_batch(pipe, n: int, args, peak: dict, flops: dict, sampler: str = "auto", stop: int | None = None) -> dict:
    import torch

    requests = _requests(n, sampler, stop)
    mem = PeakMemory(pipe.device)
    decode = not args.no_decode
    for _ in range(args.warmup):
        run_once(pipe, requests, decode)
    mem.reset()
    reps = [run_once(pipe, requests, decode) for _ in range(max(1, args.reps))]
    peak_mem = mem.peak()
    best = min(reps, key=lambda r: r["generate_s"])
    best_tok = min(r["token_stage_s"] for r in reps)
    med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
    after = matmul_peak(pipe.device, pipe.dtype)
    ref = max(peak["matmul_flops_per_s"], after["matmul_flops_per_s"])
    peak["matmul_flops_per_s"] = ref
    tok_flops = flops["total"]
    rec = {
        "kind": "batch", "preset": args.preset, "sampler": pipe.resolve_sampler(sampler), "guidance_stop_scale": stop,
        "size": pipe.image_size, "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""), "compile": bool(args.compile), "batch_size": n,
        "images_per_s": n / best["generate_s"], "s_per_image": best["generate_s"] / n,
        "latency_s": best["generate_s"], "median_s_per_image": med["generate_s"] / n,
        "peak_mem_bytes": peak_mem, "peak_mem_kind": mem.kind,
        "flops_per_image": tok_flops / n, "decoder_flops_per_image": flops["decoder_per_image"],
        "token_stage_s": best_tok, "token_stage_median_s": med["token_stage_s"],
        "token_stage_flops_per_s": tok_flops / best_tok,
        "matmul_flops_per_s": ref, "matmul_flops_per_s_after": after["matmul_flops_per_s"],
        "token_stage_fraction_of_matmul_peak": tok_flops / best_tok / ref,
        "token_stage_fraction_median": tok_flops / med["token_stage_s"] / ref,
        "fraction_of_matmul_peak": (tok_flops + (flops["decoder_per_image"] * n if decode else 0))
        / best["generate_s"] / ref,
        "stages_s": {k: best[k] for k in ("text_encode_s", "token_s", "decode_s", "png_s")},
        "png_s_per_image": best["png_s"] / n, "reps": len(reps), "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if not args.no_breakdown:
        rows, total = scale_breakdown(pipe, requests)
        rec["per_scale"] = rows
        rec["breakdown_token_s"] = total
    return rec


def batch_sizes(args, pipe) -> list[int]:
    if args.batch_sizes != "auto":
        return parse_int_list(args.batch_sizes)
    from model.compile import default_buckets
    from model.memory import free_device_bytes, plan_for_pipeline

    free = free_device_bytes(pipe.device)
    if free is None:
        return [1, 2, 4, 8]
    most = plan_for_pipeline(pipe).max_batch(free, args.memory_margin)
    return list(default_buckets(max(1, most)))


def flop_counts(pipe, n: int, sampler: str = "auto", stop: int | None = None) -> dict:
    from bench.flops import TextEncoderShape, decoder_flops, generation_flops

    text = TextEncoderShape.of(pipe.text_encoder.model.config, pipe.cfg.text_len)
    texts = len({PROMPT.format(i=i) for i in range(n)} | {""})
    head_images = n if pipe.resolve_sampler(sampler) == "head" else 0
    g = generation_flops(pipe.cfg, n, text, texts, head_images=head_images, guidance_stop=stop)
    g["decoder_per_image"] = decoder_flops(pipe.cfg)
    return g


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def sweep(pipe, sizes: list[int], args, peak: dict, report, sampler: str = "auto", stop: int | None = None) -> list[dict]:
    """bench_batch at every size (then doubling with --until-oom); an out-of-memory error ends it."""
    import torch

    records, n, i = [], None, 0
    while True:
        if i < len(sizes):
            n = sizes[i]
        elif args.until_oom and n is not None:
            n *= 2
        else:
            return records
        i += 1
        try:
            pipe.reserve(n)
            rec = bench_batch(pipe, n, args, peak, flop_counts(pipe, n, sampler, stop), sampler, stop)
        except Exception as exc:  # noqa: BLE001 - an OOM ends the sweep, anything else is re-raised
            if not is_oom(exc):
                raise
            report({"kind": "oom", "batch_size": n, "error": str(exc).splitlines()[0][:200]})
            pipe._cache = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return records
        records.append(rec)
        report(rec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.pipeline import StarPipeline, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        set_clock(args.clock, resolve_device(args.device))
    except ValueError as exc:
        print(f"python -m bench.sampler: {exc}", file=sys.stderr)
        return 2
    pipe = StarPipeline.load(args.preset, device=args.device, dtype=args.dtype)
    if args.size is not None and args.size != pipe.image_size:
        print(f"--size {args.size}: preset {args.preset} makes {pipe.image_size} px images", file=sys.stderr)
        return 2
    samplers = [x for x in args.sampler.replace(" ", "").split(",") if x]
    try:
        for sampler in samplers:
            pipe.resolve_sampler(sampler)
    except ValueError as e:
        print(f"--sampler: {e}", file=sys.stderr)
        return 2
    try:
        stops = [None if x == "none" else int(x) for x in args.guidance_stop_scale.replace(" ", "").split(",") if x]
        for stop in stops:
            pipe.cfg_stops(_requests(1, "plain", stop))
    except ValueError as e:
        print(f"--guidance-stop-scale: {e}", file=sys.stderr)
        return 2
    out_file = open(args.out, "a", encoding="utf-8") if args.out else None

    def report(rec: dict) -> None:
        emit(rec, args.json)
        if out_file:
            emit(rec, True, out_file)

    peak = matmul_peak(pipe.device, pipe.dtype)
    report({"kind": "machine", **machine_info(pipe.device), "preset": args.preset, "device": str(pipe.device),
            "dtype": str(pipe.dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "clock": args.clock,
            **peak})
    sizes = batch_sizes(args, pipe)
    if args.compile:
        from model.compile import compile_pipeline, warm_up

        compile_pipeline(pipe, sizes, mode=args.compile_mode, backend=args.compile_backend,
                         dynamic=args.compile_dynamic)
        report({"kind": "compile", "buckets": sizes, "warmup_s": warm_up(pipe, sizes)})
    records = []
    for sampler in samplers:
        for stop in stops:
            done = sweep(pipe, sizes, args, peak, report, sampler, stop)
            if done:
                report(summary(done, args, pipe, peak))
            records += done
    for rec in sampler_costs([r for r in records if r.get("guidance_stop_scale") is None]) + guidance_stop_costs(records):
        report(rec)
    if args.plot and records:
        plot(args.plot, records)
    if out_file:
        out_file.close()
    return 0


def summary(records: list[dict], args, pipe, peak: dict) -> dict:
    best = max(records, key=lambda r: r["images_per_s"])
    return {"kind": "summary", "preset": args.preset, "sampler": records[0].get("sampler"),
            "guidance_stop_scale": records[0].get("guidance_stop_scale"),
            "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""), "compile": bool(args.compile),
            "s_per_image_batch1": next((r["s_per_image"] for r in records if r["batch_size"] == 1), None),
            "best_images_per_s": best["images_per_s"], "best_batch_size": best["batch_size"],
            "token_stage_fraction_at_best": best["token_stage_fraction_of_matmul_peak"],
            "matmul_flops_per_s": peak["matmul_flops_per_s"]}


def sampler_costs(records: list[dict]) -> list[dict]:
    """Per batch size measured with both samplers: what the sampler head costs over plain sampling."""
    by = {(r.get("sampler"), r["batch_size"]): r for r in records}
    out = []
    for (sampler, n), head in sorted(by.items(), key=lambda kv: kv[0][1]):
        plain = by.get(("plain", n))
        if sampler != "head" or plain is None:
            continue
        out.append({"kind": "sampler_cost", "batch_size": n,
                    "plain_s_per_image": plain["s_per_image"], "head_s_per_image": head["s_per_image"],
                    "s_per_image_head_over_plain": head["s_per_image"] / plain["s_per_image"],
                    "token_stage_head_over_plain": head["token_stage_s"] / plain["token_stage_s"],
                    "flops_head_over_plain": head["flops_per_image"] / plain["flops_per_image"],
                    "plain_flops_per_image": plain["flops_per_image"], "head_flops_per_image": head["flops_per_image"]})
    return out


def guidance_stop_costs(records: list[dict]) -> list[dict]:
    """Per sampler and batch size measured with and without fast guidance: what each stop saves."""
    full = {(r.get("sampler"), r["batch_size"]): r for r in records if r.get("guidance_stop_scale") is None}
    out = []
    for fast in records:
        base = full.get((fast.get("sampler"), fast["batch_size"]))
        if fast.get("guidance_stop_scale") is None or base is None:
            continue
        out.append({"kind": "guidance_stop_cost", "sampler": fast.get("sampler"), "batch_size": fast["batch_size"],
                    "guidance_stop_scale": fast["guidance_stop_scale"],
                    "full_token_stage_s_per_image": base["token_stage_s"] / base["batch_size"],
                    "fast_token_stage_s_per_image": fast["token_stage_s"] / fast["batch_size"],
                    "token_stage_fast_over_full": fast["token_stage_s"] / base["token_stage_s"],
                    "s_per_image_fast_over_full": fast["s_per_image"] / base["s_per_image"],
                    "flops_fast_over_full": fast["flops_per_image"] / base["flops_per_image"]})
    return out


def plot(path: str, records: list[dict]) -> str:
    from bench.plot import line_panels

    r0 = records[0]
    title = f"bench.sampler {r0['preset']} {r0['size']}px {r0['device']} {r0['dtype']}"
    def variant(r: dict) -> str:
        stop = r.get("guidance_stop_scale")
        return r.get("sampler") or "" if stop is None else f"{r.get('sampler')}, unguided from scale {stop}"

    samplers = list(dict.fromkeys(variant(r) for r in records))

    def series(key: str, label: str) -> dict:
        named = (lambda s: label) if len(samplers) == 1 else (lambda s: f"{label} ({s})")  # noqa: E731
        return {named(s): [(r["batch_size"], r[key]) for r in records if variant(r) == s] for s in samplers}

    return line_panels(path, title, [
        {"title": "images per second", "x_label": "batch size", "series": series("images_per_s", "images/s")},
        {"title": "fraction of the matmul peak", "x_label": "batch size",
         "series": {**series("token_stage_fraction_of_matmul_peak", "token stage"),
                    **series("fraction_of_matmul_peak", "whole generation")}},
    ])


if __name__ == "__main__":
    sys.exit(main())
