#!/usr/bin/env bash
# One GPU check for issue 3, to run in a single device call (about 8.5 minutes; step limits add up to 510 s):
#
#   run(command="bash bench/gpu_check.sh", carry=[".bench"], timeout_s=570)
#
# All on the roberta-base architecture (random weights from .bench/models/roberta-base: the FLOPs
# of roberta-base), AG News rows from .bench/data/ag_news. What the last GPU session (H200,
# 2026-11-27, BENCHMARKS.md) left open, in order of what it costs to learn:
# (a) train speed, seed recipe, effective batch 32, bf16, 3 epochs (first epoch vs later ones: the
#     first was 2.6x slower than later epochs, a per-new-shape warm-up?): loraclf with fused
#     accumulation, the same with batch lengths padded to multiples of 32 (fewer distinct shapes),
#     and the tuned HF Trainer                                 -> train_speed_roberta.{json,md}
# (b) where a GPU step's time goes: torch.profiler over a short fused run, host operator time vs
#     device kernel time (is the step host-bound?)             -> profile_gpu_roberta.{json,md}
# (c) inference on (a)'s run: loraclf predict (bf16 weights, fp32) vs pipeline at batch 1, 32, 256
#     (target >= 25,000 examples/s); bf16 was slower than fp32 at batch <= 32 last time
#                                                              -> infer_speed_roberta.{json,md}
# (d) CUDA graphs (train.compile_mode reduce-overhead + pad32), which died with SIGSEGV last time,
#     with faulthandler on to say where                        -> train_speed_roberta_cg.{json,md}
# Progress, with timestamps, goes to stdout and $OUT/gpu_check.log.
# Each step has its own time limit; a failed step is logged and the next one runs.
#
# CPU smoke test (tiny sizes, this machine's venv, no wheel install):
#   SMOKE=1 OUT=/tmp/gpuout bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpuout}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
LOG="$OUT/gpu_check.log"
: >"$LOG"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
# run a step with a time limit, its output timestamped into the log
step() {
  local limit=$1 name=$2; shift 2
  say "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | while IFS= read -r line; do
    printf '[%s] %s\n' "$(date +%H:%M:%S)" "$line"
  done | grep --line-buffered -v -e 'Loading weights' -e 'warnings.warn' -e 'FutureWarning' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "=== $name: exit $rc after $((SECONDS - t0))s"
  return 0
}

if [ "$SMOKE" = 1 ]; then
  PY=${PY:-$PWD/.venv/bin/python}
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  PY=${PY:-python3}
  if [ -d .bench/whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$PWD/.bench/site" .bench/whl/*.whl 2>&1 | tail -3
  fi
  export PYTHONPATH="$PWD/.bench/site:$PWD/src"
fi
# Tokenizer parallelism left on: with it off, one thread tokenized every text last time (a share of (c)'s time)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export LORACLF_BENCH_CACHE=${LORACLF_BENCH_CACHE:-/tmp/loraclf-bench}

TRAIN=.bench/data/ag_news/train_partial.csv.gz
TEST=.bench/data/ag_news/test.csv.gz
MINILM=.bench/minilm-fp16
ROBERTA=.bench/models/roberta-base
[ -f "$TRAIN" ] || TRAIN=../shared/data/ag_news/train_partial.csv.gz
[ -f "$TEST" ] || TEST=../shared/data/ag_news/test.csv.gz
[ -d "$ROBERTA" ] || ROBERTA=../shared/models/roberta-base

if [ "$SMOKE" = 1 ]; then
  A_LIMIT=500; A_ARGS=(--rows 64 --val-rows 32 --epochs 2); A_EACH=150
  B_LIMIT=200; B_ARGS=(--rows 64)
  C_LIMIT=400; C_ARGS=(--rows 64 --rows-bs1 4 --batch-sizes 1,32)
  D_LIMIT=300; D_ARGS=(--rows 64 --val-rows 32)
else
  A_LIMIT=230; A_ARGS=(--rows 4000 --val-rows 500 --epochs 3); A_EACH=70
  B_LIMIT=60; B_ARGS=(--rows 800)
  C_LIMIT=130; C_ARGS=(--rows -1 --rows-bs1 128 --batch-sizes 1,32,256)
  D_LIMIT=90; D_ARGS=(--rows 3000 --val-rows 300)
fi

say "gpu_check: SMOKE=$SMOKE OUT=$OUT python=$PY"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "| cpus", os.cpu_count(),
      "| torch threads", torch.get_num_threads())
for m in ("transformers", "peft", "accelerate", "datasets", "pydantic", "tokenizers"):
    try:
        print(f"  {m} {importlib.import_module(m).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"  {m} MISSING ({e})")
EOF
} 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- (a) roberta-arch train speed
RUN_A=${LORACLF_BENCH_CACHE}/gpu-roberta-run
step "$A_LIMIT" "(a) roberta-base arch train speed, 3 epochs: loraclf bf16 fused, fused+pad32, tuned Trainer bf16" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --precision bf16 \
  --contenders loraclf:bf16:fused,loraclf:bf16:fused:pad32,tuned:bf16 --repeats 1 \
  --keep-run "$RUN_A" --timeout "$A_EACH" --name train_speed_roberta --out "$OUT/train_speed_roberta.json" "${A_ARGS[@]}"

# ---------------------------------------------------------------- (b) profile of GPU steps
step "$B_LIMIT" "(b) profile: host operator time vs device kernel time, fused bf16" \
  "$PY" bench/profile_train.py --model "$ROBERTA" --train "$TRAIN" --precision bf16 \
  --override train.fuse_accumulation true --name profile_gpu_roberta --out-dir "$OUT" "${B_ARGS[@]}"

# ---------------------------------------------------------------- (c) inference on (a)'s run
if [ -f "$RUN_A/run.json" ]; then
  step "$C_LIMIT" "(c) roberta-base arch inference: loraclf bf16/fp32 vs pipeline" \
    "$PY" bench/infer_speed.py --run "$RUN_A" --test "$TEST" --contenders loraclf:bf16,loraclf:fp32,pipeline \
    --repeats 1 --process-per contender --agreement-rows 0 --timeout $((C_LIMIT - 10)) \
    --name infer_speed_roberta --out "$OUT/infer_speed_roberta.json" "${C_ARGS[@]}"
else
  say "(c) skipped: no run from (a)"
fi

# ---------------------------------------------------------------- (d) CUDA graphs, with a stack on a crash
export PYTHONFAULTHANDLER=1
step "$D_LIMIT" "(d) CUDA graphs: loraclf bf16 fused, compile_mode reduce-overhead, pad32" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --epochs 1 --precision bf16 \
  --contenders loraclf:bf16:fused:cg:pad32 --repeats 1 --timeout $((D_LIMIT - 10)) \
  --name train_speed_roberta_cg --out "$OUT/train_speed_roberta_cg.json" "${D_ARGS[@]}"

# The device returns at most 8 files: the Markdown tables travel as one file.
for f in "$OUT"/*.md; do [ -f "$f" ] && { echo "<!-- $(basename "$f") -->"; cat "$f"; echo; }; done >"$OUT/tables.md.tmp"
rm -f "$OUT"/*.md && mv "$OUT/tables.md.tmp" "$OUT/tables.md"
say "gpu_check done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
