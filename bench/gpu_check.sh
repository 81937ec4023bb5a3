#!/usr/bin/env bash
# One GPU check for issue 3, to run on an H100 in a single device call (about 6-8 minutes):
#
#   run(command="bash bench/gpu_check.sh", carry=[".bench"], timeout_s=600)
#
# (a) loraclf trains the seed recipe (LoRA r=12 on query,value of layers 0,1,5) on all-MiniLM-L6-v2
#     (.bench/minilm-fp16, loaded as fp32) for 6 epochs on every row of
#     .bench/data/ag_news/train_partial.csv.gz (5 % carved for validation), evaluated on the full
#     7,600-row test set, precision auto (bf16 on the GPU) -> minilm_run.json, minilm_metrics.jsonl
# (b) train speed on the roberta-base architecture (random weights from .bench/models/roberta-base),
#     seed recipe, effective batch 32, loraclf (auto = bf16) vs the tuned HF Trainer in bf16
#     (target >= 12,000 train examples/s)                       -> train_speed_roberta.{json,md}
# (c) inference on the run trained in (b): loraclf predict (bf16 and fp32) vs pipeline at batch 1, 32,
#     256 (target >= 25,000 examples/s), bf16-vs-fp32 agreement  -> infer_speed_roberta.{json,md}
# Progress, with timestamps, goes to stdout and $OUT/gpu_check.log (7 files in $OUT in all).
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
  A_LIMIT=300; A_ARGS=(--train.epochs 1 --data.max_train_samples 64 --data.max_eval_samples 64)
  B_LIMIT=400; B_ARGS=(--rows 64 --val-rows 32)
  C_LIMIT=400; C_ARGS=(--rows 64 --rows-bs1 4 --batch-sizes 1,32)
else
  A_LIMIT=220; A_ARGS=()
  B_LIMIT=170; B_ARGS=(--rows 12000 --val-rows 1000)
  C_LIMIT=140; C_ARGS=(--rows -1 --rows-bs1 256 --batch-sizes 1,32,256)
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

# ---------------------------------------------------------------- (a) MiniLM, 6 epochs, full data
RUN_A=${LORACLF_BENCH_CACHE}/gpu-minilm-run
step "$A_LIMIT" "(a) MiniLM seed recipe, 6 epochs, all train_partial rows, full test" \
  "$PY" -c 'import sys; from loraclf.cli import main; sys.exit(main())' train --config configs/agnews-seed.yaml --quiet \
  --model.name_or_path "$MINILM" --lora.layers '[0,1,5]' --data.train "$TRAIN" --data.test "$TEST" \
  --train.output_dir "$RUN_A" --train.overwrite true "${A_ARGS[@]}"
if [ -f "$RUN_A/run.json" ]; then
  cp "$RUN_A/run.json" "$OUT/minilm_run.json"
  cp "$RUN_A/metrics.jsonl" "$OUT/minilm_metrics.jsonl" 2>/dev/null
  "$PY" - "$RUN_A/run.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
t, m = r.get("throughput") or {}, r.get("metrics") or {}
print(f"(a) status {r.get('status')}, {r.get('device')} {r.get('precision')}, rows {r.get('rows')}, "
      f"best epoch {r.get('best_epoch')}, steps {r.get('optimizer_steps')}")
print(f"(a) train {t.get('train_examples_per_s') or 0:.0f} ex/s, {t.get('train_tokens_per_s') or 0:.0f} real tok/s, "
      f"{t.get('train_seconds') or 0:.1f} s training loop, wall {r.get('wall_time_s') or 0:.1f} s")
print(f"(a) validation {m.get('validation')}\n(a) TEST {m.get('test')}")
EOF
fi

# ---------------------------------------------------------------- (b) roberta-arch train speed
RUN_B=${LORACLF_BENCH_CACHE}/gpu-roberta-run
step "$B_LIMIT" "(b) roberta-base arch train speed: loraclf (auto=bf16) vs tuned Trainer (bf16)" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --epochs 1 --precision auto \
  --contenders loraclf,tuned:bf16 --repeats 1 --keep-run "$RUN_B" --timeout $((B_LIMIT - 10)) \
  --name train_speed_roberta --out "$OUT/train_speed_roberta.json" "${B_ARGS[@]}"

# ---------------------------------------------------------------- (c) inference on (b)'s run
if [ -f "$RUN_B/run.json" ]; then
  step "$C_LIMIT" "(c) roberta-base arch inference: loraclf bf16/fp32 vs pipeline" \
    "$PY" bench/infer_speed.py --run "$RUN_B" --test "$TEST" --contenders loraclf:bf16,loraclf:fp32,pipeline \
    --repeats 1 --process-per contender --agreement-rows 0 --timeout $((C_LIMIT - 10)) \
    --name infer_speed_roberta --out "$OUT/infer_speed_roberta.json" "${C_ARGS[@]}"
else
  say "(c) skipped: no run from (b)"
fi

say "gpu_check done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
