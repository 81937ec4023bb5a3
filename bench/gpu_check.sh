#!/usr/bin/env bash
# One GPU check for issue 3, to run on an H100 in a single device call (about 8-9 minutes; the step limits add up to 500 s):
#
#   run(command="bash bench/gpu_check.sh", carry=[".bench"], timeout_s=560)
#
# All on the roberta-base architecture (random weights from .bench/models/roberta-base: the FLOPs
# of roberta-base), AG News rows from .bench/data/ag_news:
# (a) train speed, seed recipe, effective batch 32, bf16: loraclf as is, loraclf with
#     train.fuse_accumulation (one batch of 32 per optimizer step) + train.compile, the same with CUDA
#     graphs (compile_mode reduce-overhead, batch lengths padded to multiples of 32), and the tuned HF
#     Trainer (target >= 12,000 train examples/s)              -> train_speed_roberta.{json,md}
# (b) frozen-prefix cache: LoRA on layers 6-11 only, 3 epochs, cache on vs off; epochs after the
#     first should be >= 1.7x faster with the cache            -> prefix_speed_roberta.{json,md}
# (c) inference on (a)'s run: loraclf predict (bf16 weights, fp32) vs pipeline at batch 1, 32, 256
#     (target >= 25,000 examples/s), bf16-vs-fp32 agreement   -> infer_speed_roberta.{json,md}
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
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORACLF_BENCH_CACHE=${LORACLF_BENCH_CACHE:-/tmp/loraclf-bench}

TRAIN=.bench/data/ag_news/train_partial.csv.gz
TEST=.bench/data/ag_news/test.csv.gz
MINILM=.bench/minilm-fp16
ROBERTA=.bench/models/roberta-base
[ -f "$TRAIN" ] || TRAIN=../shared/data/ag_news/train_partial.csv.gz
[ -f "$TEST" ] || TEST=../shared/data/ag_news/test.csv.gz
[ -d "$ROBERTA" ] || ROBERTA=../shared/models/roberta-base

if [ "$SMOKE" = 1 ]; then
  A_LIMIT=500; A_ARGS=(--rows 64 --val-rows 32)
  B_LIMIT=300; B_ARGS=(--rows 64 --val-rows 32)
  C_LIMIT=400; C_ARGS=(--rows 64 --rows-bs1 4 --batch-sizes 1,32)
else
  # (a) gives each contender (A_LIMIT - 15) / 4 s: room for the compiled ones' compilation
  A_LIMIT=315; A_ARGS=(--rows 6000 --val-rows 1000)
  B_LIMIT=90; B_ARGS=(--rows 3000 --val-rows 1000)
  C_LIMIT=90; C_ARGS=(--rows -1 --rows-bs1 256 --batch-sizes 1,32,256)
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
step "$A_LIMIT" "(a) roberta-base arch train speed: loraclf bf16, fused+compiled, fused+CUDA graphs, tuned Trainer bf16" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --epochs 1 --precision bf16 \
  --contenders loraclf:bf16,loraclf:bf16:fused:compile,loraclf:bf16:fused:cg:pad32,tuned:bf16 --repeats 1 \
  --keep-run "$RUN_A" --timeout $(((A_LIMIT - 15) / 4)) --name train_speed_roberta --out "$OUT/train_speed_roberta.json" "${A_ARGS[@]}"

# ---------------------------------------------------------------- (b) frozen-prefix cache
step "$B_LIMIT" "(b) frozen-prefix cache, LoRA on layers 6-11: cache on vs off" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --epochs 3 --precision bf16 --layers 6,7,8,9,10,11 \
  --contenders loraclf:bf16,loraclf:bf16:noprefix --repeats 1 --timeout $(((B_LIMIT - 10) / 2)) \
  --name prefix_speed_roberta --out "$OUT/prefix_speed_roberta.json" "${B_ARGS[@]}"

# ---------------------------------------------------------------- (c) inference on (a)'s run
RUN_B=$RUN_A
if [ -f "$RUN_B/run.json" ]; then
  step "$C_LIMIT" "(c) roberta-base arch inference: loraclf bf16/fp32 vs pipeline" \
    "$PY" bench/infer_speed.py --run "$RUN_B" --test "$TEST" --contenders loraclf:bf16,loraclf:fp32,pipeline \
    --repeats 1 --process-per contender --agreement-rows 0 --timeout $((C_LIMIT - 10)) \
    --name infer_speed_roberta --out "$OUT/infer_speed_roberta.json" "${C_ARGS[@]}"
else
  say "(c) skipped: no run from (a)"
fi

say "gpu_check done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
