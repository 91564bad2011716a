"""`python -m bench.report DIR [--targets gpu|cpu]`: one Markdown table of every bench.sampler /
bench.agreement / bench.decode / bench.png JSON line under DIR, and which targets of
docs/benchmarks.md are met."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {
    # (what, test on the batch rows of one run)
    "gpu": [("s/image at batch 1 <= 0.5", lambda rows: _at(rows, 1, "s_per_image"), lambda v: v <= 0.5),
            ("best images/s >= 4", lambda rows: max(r["images_per_s"] for r in rows), lambda v: v >= 4.0),
            ("token stage at the best batch >= 50% of the matmul peak",
             lambda rows: max(rows, key=lambda r: r["images_per_s"])["token_stage_fraction_of_matmul_peak"],
             lambda v: v >= 0.5)],
    "cpu": [("token stage at batch 1 >= 60% of the matmul peak",
             lambda rows: _at(rows, 1, "token_stage_fraction_of_matmul_peak"), lambda v: v >= 0.6),
            ("token stage at batch 8 >= 60% of the matmul peak",
             lambda rows: _at(rows, 8, "token_stage_fraction_of_matmul_peak"), lambda v: v >= 0.6)],
}


def _at(rows, n, key):
    return next((r[key] for r in rows if r["batch_size"] == n), None)


def load(directory: Path) -> list[dict]:
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("{"):
                rec = json.loads(line)
                rec["_file"] = path.name
                records.append(rec)
    return records


def table(records: list[dict]) -> str:
    head = ("| file | preset | device | dtype | compile | batch | images/s | s/image | token stage s | "
            "token stage / matmul peak | peak memory GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r.get("kind") != "batch":
            continue
        lines.append(f"| {r['_file']} | {r['preset']} | {r['device']} | {r['dtype']} | {r['compile']} | "
                     f"{r['batch_size']} | {r['images_per_s']:.3f} | {r['s_per_image']:.3f} | "
                     f"{r['token_stage_s']:.3f} | {r['token_stage_fraction_of_matmul_peak']:.1%} | "
                     f"{r['peak_mem_bytes'] / 2**30:.1f} |")
    for r in records:
        if r.get("kind") == "agreement":
            lines.append("")
            lines.append(f"agreement {r['dtype']} vs {r['ref_dtype']} ({r['preset']}, {r['device']}): teacher-forced "
                         f"top-1 {r['teacher_forced_top1_agreement']:.1%}, float32 top-1 in top-5 "
                         f"{r['teacher_forced_ref_top1_in_top5']:.1%}, logits rel. RMS error "
                         f"{r['logits_rel_rms_err']:.2e}, greedy tokens equal {r['greedy_token_agreement']:.1%}")
    lines += [_decode_line(r) for r in records if r.get("kind") == "decode"]
    fast = [r for r in records if r.get("kind") == "guidance_stop_cost"]
    if fast:
        lines += ["", "| fast guidance | sampler | batch | unguided from scale | token stage s/image, full -> fast | "
                  "time fast / full | FLOPs fast / full |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['_file']} | {r['sampler']} | {r['batch_size']} | {r['guidance_stop_scale']} | "
                  f"{r['full_token_stage_s_per_image']:.3f} -> {r['fast_token_stage_s_per_image']:.3f} | "
                  f"{r['token_stage_fast_over_full']:.2f} | {r['flops_fast_over_full']:.2f} |" for r in fast]
    pngs = [r for r in records if r.get("kind") == "png"]
    if pngs:
        lines += ["", "| PNG, 1024 px | CPU ms (one core) | MB | pixels equal |", "|---|---|---|---|"]
        lines += [f"| png {r['image']} {r['option']} | {r['cpu_ms']:.1f} | {r['bytes'] / 1e6:.2f} | "
                  f"{r['pixels_equal']} |" for r in pngs]
    return "\n".join(lines)


def _decode_line(r: dict) -> str:
    return (f"\ndecode ({r['preset']}, {r['device']}, batch {r['batch_size']}): {r['per_image_ms_alone']:.1f} ms per "
            f"image one per call, {r['per_image_ms_batched']:.1f} ms batched; bit-identical: {r['bit_identical']} "
            f"(max abs diff {r['max_abs_diff']:.2e}); the pipeline decodes {r['pipeline_decode_chunk']} per call")


def check(records: list[dict], which: str) -> list[str]:
    runs: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind") == "batch" and r.get("guidance_stop_scale") is None:   # targets: official sampling
            runs.setdefault(r["_file"], []).append(r)
    out = []
    for name, rows in runs.items():
        for what, get, ok in TARGETS[which]:
            v = get(rows)
            verdict = "not measured" if v is None else ("met" if ok(v) else "NOT met")
            out.append(f"- {name}: {what}: {'-' if v is None else f'{v:.3g}'} ({verdict})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("directory")
    ap.add_argument("--targets", choices=sorted(TARGETS), default=None)
    args = ap.parse_args(argv)
    records = load(Path(args.directory))
    print(table(records))
    if args.targets:
        print()
        print("\n".join(check(records, args.targets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
