"""`python -m bench.decode`: VQ-VAE decode milliseconds per image, one image per decoder call
against one batched call, and whether the batched call gives every image bit for bit what one
call per image gives on this device.

    python -m bench.decode --preset small --device cpu --threads 1 --batch 8 --json
    python -m bench.decode --preset star-1024 --device cuda --batch 8 --json

Input: random f_hat maps of the preset's size (N(0, 1); the decoder's cost does not depend on the
values, and bit-identity must hold for any input). Every rep decodes the same N maps both ways
(`StarPipeline.decode(f_hat, chunk=1)` and `chunk=N`), best and median reported. `bit_identical`
is what decides whether the pipeline may batch the decode on that device
(model.pipeline.BATCH_INVARIANT_DECODE_CHUNK; `pipeline_decode_chunk` is what it uses now).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from bench.common import emit, machine_info, set_clock, timed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="model preset (random weights) or model directory")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--vae-dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8, help="images per batched call")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="cpu: this process's CPU time instead of wall time (CPU device only)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return ap.parse_args(argv)


def measure(pipe, batch: int, reps: int) -> dict:
    """Seconds per image both ways (best and median of reps), and the equality of the results."""
    import torch

    cfg, dev = pipe.cfg, pipe.device
    side = cfg.patch_nums[-1]
    g = torch.Generator(device="cpu").manual_seed(0)
    f_hat = torch.randn(batch, cfg.vae_channels, side, side, generator=g).to(dev)
    pipe.decode(f_hat[:1], chunk=1)                                   # warm-up (kernel choice, allocator)
    alone_s, batched_s = [], []
    for _ in range(max(1, reps)):
        alone, t1 = timed(lambda: pipe.decode(f_hat, chunk=1), dev)
        batched, tn = timed(lambda: pipe.decode(f_hat, chunk=batch), dev)
        alone_s.append(t1 / batch)
        batched_s.append(tn / batch)
    return {"per_image_ms_alone": 1e3 * min(alone_s), "per_image_ms_batched": 1e3 * min(batched_s),
            "per_image_ms_alone_median": 1e3 * statistics.median(alone_s),
            "per_image_ms_batched_median": 1e3 * statistics.median(batched_s),
            "bit_identical": bool(torch.equal(alone, batched)),
            "max_abs_diff": float((alone.float() - batched.float()).abs().max())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.pipeline import StarPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = StarPipeline.load(args.preset, device=args.device, dtype="auto", vae_dtype=args.vae_dtype)
    set_clock(args.clock, pipe.device)
    rec = {"kind": "decode", **machine_info(pipe.device), "preset": args.preset, "size": pipe.image_size,
           "device": str(pipe.device), "vae_dtype": args.vae_dtype, "batch_size": args.batch,
           "threads": torch.get_num_threads(), "reps": args.reps, "clock": args.clock,
           "pipeline_decode_chunk": pipe.decode_chunk,
           **measure(pipe, args.batch, args.reps)}
    rec["load_avg_1m_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    emit(rec, args.json)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            emit(rec, True, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
