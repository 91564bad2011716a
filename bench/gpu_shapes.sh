#!/usr/bin/env bash
# Retrain the shapes model's transformer on one CUDA GPU: one data pass, then one or more recipes
# trained side by side on the same GPU for a fixed wall-clock budget each, each scored for prompt
# adherence on seeds that are NOT the evaluation seeds (0,1,2), so choosing among them does not fit
# the test.
#
#   bash bench/gpu_shapes.sh                        # defaults below, results in OUT
#   DEVICE=cpu IMAGES=300 AR_SECONDS=5 PROMPTS=2 CONFIGS="a:ar_batch=8" bash bench/gpu_shapes.sh   # dry run
#
# Steps:
#   1. data     python -m training.train --from-model model/zoo/shapes --stages latents,quant: IMAGES
#               procedural images -> latents -> tokens with the shipped VQ-VAE (kept as it is)
#   2. train    per CONFIGS entry "name:key=value,key=value" (recipe overrides, arch.depth=4 etc.),
#               in parallel: --stages ar,export with ar_seconds=AR_SECONDS, then
#               python -m training.adherence <model> --seeds SWEEP_SEEDS SWEEP (a sampling sweep)
#   3. collect  OUT/weights-<name>.pt (transformer + text encoder state dicts, float16 when the
#               float32 file would pass MAX_MB), OUT/shapes-runs.tgz (recipes, logs, sweeps),
#               and a summary on stdout; exit status 0 when at least one recipe trained
# Installs nothing: PYTHON, else .venv/bin/python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

OUT=${OUT:-artifacts/gpu-shapes}
WORK=${WORK:-/tmp/shapes-gpu}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-200000}
AR_SECONDS=${AR_SECONDS:-270}
WORKERS=${WORKERS:-12}
PROMPTS=${PROMPTS:-28}
SWEEP_SEEDS=${SWEEP_SEEDS:-100,101}
SWEEP=${SWEEP:-"--cfg 1.5,3,5 --top-k 0,20"}
MAX_MB=${MAX_MB:-15}
# Default: the shipped model's recipe alone. Several entries share the GPU by time-slicing (on
# 2026-11-28 three small recipes side by side got ~12 steps/s each), so list several only to compare,
# e.g. CONFIGS="d3b256:ar_batch=256 d4b512:arch.depth=4,ar_batch=512"
CONFIGS=${CONFIGS:-"d4b512:arch.depth=4,ar_batch=512,ar_lr=0.001"}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
read -r -a sweep <<< "$SWEEP"
common=(--set "images=$IMAGES" --device "$DEVICE" --no-progress --threads 2)

t0=$(date +%s)
"$PY" -m training.train --work "$WORK/data" --from-model model/zoo/shapes --stages latents,quant \
  --workers "$WORKERS" "${common[@]}" > "$WORK/data.out" 2>&1 || { cat "$WORK/data.out"; exit 1; }
echo "gpu_shapes: data ($IMAGES images) in $(( $(date +%s) - t0 )) s" >&2

names=()
for entry in $CONFIGS; do
  name=${entry%%:*}; sets=${entry#*:}; names+=("$name")
  d=$WORK/$name; mkdir -p "$d"
  for f in latents tokens quant decoder encoder; do ln -sf "$WORK/data/$f.pt" "$d/$f.pt"; done
  extra=(); IFS=, read -r -a kv <<< "$sets"; for x in "${kv[@]}"; do extra+=(--set "$x"); done
  (
    "$PY" -m training.train --work "$d" --stages ar,export --export "$d/model" "${common[@]}" \
      --set "ar_seconds=$AR_SECONDS" --set ar_steps=1000000 --set ckpt_every=5000 "${extra[@]}" > "$d/train.out" 2>&1 \
    && "$PY" -m training.adherence "$d/model" --device "$DEVICE" --prompts "$PROMPTS" --seeds "$SWEEP_SEEDS" \
         "${sweep[@]}" > "$d/sweep.json" 2> "$d/sweep.err"
    echo "gpu_shapes: $name finished (rc $?) at $(( $(date +%s) - t0 )) s" >&2
  ) &
done
wait

trained=0
for name in "${names[@]}"; do
  d=$WORK/$name
  [ -f "$d/ar.pt" ] || { echo "gpu_shapes: $name has no ar.pt"; tail -5 "$d/train.out"; continue; }
  trained=$((trained + 1))
  "$PY" - "$d" "$OUT/weights-$name.pt" "$MAX_MB" <<'PYEOF'
import json, sys, torch
d, out, max_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
ck = torch.load(f"{d}/ar.pt", map_location="cpu", weights_only=True)
size = sum(v.numel() * 4 for part in ("transformer", "text") for v in ck[part].values()) / 1e6
dtype = torch.float16 if size > max_mb else torch.float32
slim = {part: {k: v.to(dtype) if v.is_floating_point() else v for k, v in ck[part].items()} for part in ("transformer", "text")}
slim.update(step=ck["step"], elapsed=ck.get("elapsed"), recipe=json.load(open(f"{d}/recipe.json")))
torch.save(slim, out)
last = [json.loads(l) for l in open(f"{d}/log.jsonl") if '"stage": "ar"' in l]
steps = [r for r in last if "loss" in r]
tail = steps[-200:]
summary = {"config": d.rsplit("/", 1)[-1], "steps": ck["step"], "seconds": ck.get("elapsed"),
           "loss_last200": round(sum(r["loss"] for r in tail) / max(1, len(tail)), 4),
           "token_acc_last200": round(sum(r.get("token_acc", 0) for r in tail) / max(1, len(tail)), 4),
           "weights_mb": round(size, 1), "stored": str(dtype)}
try:
    sweep = json.load(open(f"{d}/sweep.json"))
    sweep = sweep if isinstance(sweep, list) else [sweep]
    summary["sweep"] = [{k: r[k] for k in ("sampling", "shape_accuracy", "colour_accuracy", "all_correct")} for r in sweep]
except Exception as e:  # noqa: BLE001 - the summary says what is missing
    summary["sweep_error"] = repr(e)
print(json.dumps(summary))
PYEOF
done
tar czf "$OUT/shapes-runs.tgz" -C "$WORK" data.out $(for n in "${names[@]}"; do
  for f in recipe.json log.jsonl train.out sweep.json sweep.err; do [ -e "$WORK/$n/$f" ] && echo "$n/$f"; done; done)
echo "gpu_shapes: done in $(( $(date +%s) - t0 )) s, $trained of ${#names[@]} recipes trained; $OUT" >&2
[ "$trained" -gt 0 ]
