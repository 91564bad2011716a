#!/usr/bin/env bash
# STAR speed on one CUDA GPU, every number in one output directory (JSON lines + PNG plots).
#
#   bash bench/gpu.sh                      # star-1024, random weights, bf16 and fp16
#   OUT=/tmp/gpu-run bash bench/gpu.sh     # choose the output directory
#
# Steps (each writes OUT/<step>.jsonl):
#   1. agreement-<dtype>   bf16 (and fp16) tokens against float32 on a small case (bench.agreement)
#   2. sampler-<dtype>     bench.sampler eager: batch 1 up to the largest batch that fits
#                          (model/memory.py from the free memory; GROW_UNTIL_OOM=1 also doubles on
#                          until a batch does not fit): latency, images/s, peak memory, FLOP fraction
#   3. sampler-<dtype>-compiled   the same with --compile (per-scale step, batch buckets 1 and the
#                          eager run's best batch), for the dtypes in COMPILE_DTYPES
#   4. decode              bench.decode: VQ decode ms per image, one image per call against one
#                          call of DECODE_BATCH images, and whether the batched call is bit-identical
#                          on this device (what decides model.pipeline.BATCH_INVARIANT_DECODE_CHUNK)
#   5. png                 bench.png: PNG encoding at 1024 px on this machine's CPU, per option
#   6. fast-guidance-<dtype>  bench.sampler eager, first dtype, at FAST_GUIDANCE_BATCHES (1,8), once
#                          with guidance on every scale and once per stop scale in FAST_GUIDANCE_STOPS
#                          (11,13: star-1024's last three / last one scales unguided): token-stage
#                          seconds and FLOPs with and without fast guidance (kind guidance_stop_cost)
#   7. report.md           one table of everything and the GPU targets, met or not
# The KV cache is the lean one (no last-scale K/V across layers) in every run: the sampler runs'
# peak memory and BATCHES=auto (the largest batch model/memory.py says fits) measure it.
#
# Installs nothing: it uses PYTHON, else the project's .venv, else python3 (torch with CUDA must be
# importable). Knobs (environment): OUT, PRESET (star-1024), DTYPES ("bfloat16 float16"),
# BATCHES (auto), REPS (3), WARMUP (1), COMPILE (1), COMPILE_DTYPES (bfloat16), COMPILE_MODE,
# COMPILE_BACKEND (inductor), COMPILE_DYNAMIC (0; 1 = one shape-generic graph per scale: compiles
# faster; the static default compiles one graph per scale and bucket, which takes a while at d30),
# AGREE_PRESET (small), AGREE_IMAGES (2), GROW_UNTIL_OOM (0), DECODE_BATCH (8), DECODE_REPS (3),
# PNG_ARGS (more bench.png flags, e.g. "--images noise --reps 1"; PNG=0 skips it),
# SAMPLER_ARGS (more bench.sampler flags, e.g. --no-breakdown), FAST_GUIDANCE (1; 0 skips step 6),
# FAST_GUIDANCE_STOPS (11,13; scale indices of PRESET's schedule), FAST_GUIDANCE_BATCHES (1,8),
# DEVICE (cuda; ALLOW_CPU=1 permits cpu, for the tests' dry run with small presets).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

OUT=${OUT:-artifacts/gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)}
PRESET=${PRESET:-star-1024}
DTYPES=${DTYPES:-"bfloat16 float16"}
BATCHES=${BATCHES:-auto}
REPS=${REPS:-3}
WARMUP=${WARMUP:-1}
COMPILE=${COMPILE:-1}
COMPILE_DTYPES=${COMPILE_DTYPES:-bfloat16}
COMPILE_MODE=${COMPILE_MODE:-}
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
AGREE_PRESET=${AGREE_PRESET:-small}
AGREE_IMAGES=${AGREE_IMAGES:-2}
GROW_UNTIL_OOM=${GROW_UNTIL_OOM:-0}
DEVICE=${DEVICE:-cuda}
read -r -a sampler_args <<< "${SAMPLER_ARGS:-}"
mkdir -p "$OUT"

if [ "$DEVICE" != "cpu" ] || [ "${ALLOW_CPU:-0}" != "1" ]; then
  cuda=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else torch.__version__)') \
    || cuda="not importable"
  if [ "$cuda" != "yes" ]; then
    echo "bench/gpu.sh: no CUDA device visible to $PY (torch $cuda)" >&2
    exit 3
  fi
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
echo "bench/gpu.sh: $PRESET on $DEVICE, dtypes [$DTYPES], results in $OUT" >&2

for dt in $DTYPES; do
  "$PY" -m bench.agreement --preset "$AGREE_PRESET" --device "$DEVICE" --dtype "$dt" \
    --images "$AGREE_IMAGES" --json --out "$OUT/agreement-$dt.jsonl" > /dev/null
done

extra=()
[ "$GROW_UNTIL_OOM" = "1" ] && extra+=(--until-oom)
for dt in $DTYPES; do
  "$PY" -m bench.sampler --preset "$PRESET" --device "$DEVICE" --dtype "$dt" --batch-sizes "$BATCHES" \
    --reps "$REPS" --warmup "$WARMUP" ${extra[@]+"${extra[@]}"} ${sampler_args[@]+"${sampler_args[@]}"} --json \
    --out "$OUT/sampler-$dt.jsonl" --plot "$OUT/sampler-$dt.png" > /dev/null
done

if [ "$COMPILE" = "1" ]; then
  for dt in $COMPILE_DTYPES; do
    best=$("$PY" - "$OUT/sampler-$dt.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
summary = [r for r in rows if r.get("kind") == "summary"]
print(summary[-1]["best_batch_size"] if summary else 1)
PYEOF
)
    batches=1; [ "$best" != "1" ] && batches="1,$best"
    mode=(); [ -n "$COMPILE_MODE" ] && mode=(--compile-mode "$COMPILE_MODE")
    [ "${COMPILE_DYNAMIC:-0}" = "1" ] && mode+=(--compile-dynamic)
    "$PY" -m bench.sampler --preset "$PRESET" --device "$DEVICE" --dtype "$dt" --batch-sizes "$batches" \
      --reps "$REPS" --warmup "$WARMUP" --compile --compile-backend "$COMPILE_BACKEND" ${mode[@]+"${mode[@]}"} \
      ${sampler_args[@]+"${sampler_args[@]}"} \
      --json --out "$OUT/sampler-$dt-compiled.jsonl" --plot "$OUT/sampler-$dt-compiled.png" > /dev/null
  done
fi

"$PY" -m bench.decode --preset "$PRESET" --device "$DEVICE" --batch "${DECODE_BATCH:-8}" \
  --reps "${DECODE_REPS:-3}" --json --out "$OUT/decode.jsonl" > /dev/null

if [ "${PNG:-1}" = "1" ]; then
  read -r -a png_args <<< "${PNG_ARGS:-}"
  "$PY" -m bench.png ${png_args[@]+"${png_args[@]}"} --json --out "$OUT/png.jsonl" > /dev/null
fi

if [ "${FAST_GUIDANCE:-1}" = "1" ]; then
  dt=${DTYPES%% *}
  "$PY" -m bench.sampler --preset "$PRESET" --device "$DEVICE" --dtype "$dt" \
    --batch-sizes "${FAST_GUIDANCE_BATCHES:-1,8}" --guidance-stop-scale "none,${FAST_GUIDANCE_STOPS:-11,13}" \
    --reps "$REPS" --warmup "$WARMUP" --no-breakdown --no-decode --json --out "$OUT/fast-guidance-$dt.jsonl" > /dev/null
fi

targets=gpu; [ "$DEVICE" = "cpu" ] && targets=cpu
"$PY" -m bench.report "$OUT" --targets "$targets" | tee "$OUT/report.md"
echo "bench/gpu.sh: done; $OUT/report.md" >&2
