#!/usr/bin/env bash
# One GPU check for issues 3 and 4, to run in a single device call (about 9 minutes; step
# limits add up to 520 s):
#
#   run(command="bash bench/gpu_check.sh", carry=[".bench"], timeout_s=570)
#
# The last GPU session (H200, 2026-11-27, BENCHMARKS.md "GPU check 2") found the training step
# host-bound (~38 ms for 32 rows, a few ms of arithmetic) and torch.compile no help. This checks
# loraclf's whole-step CUDA graphs (train.cuda_graphs), on the roberta-base architecture (random
# weights from .bench/models/roberta-base: the FLOPs of roberta-base), AG News rows from
# .bench/data/ag_news, then uses the GPU for issue 4's MiniLM study on all of train_partial:
# (g) correctness: eager vs CUDA graphs, fp32, dropout off, 640 rows, 2 epochs: per-step losses and
#     adapters must agree; on a failed capture, where the step synchronised   -> graph_check.{json,md}
# (a) side by side, 4,000 rows, 3 epochs, bf16, seed recipe: loraclf fused (eager) vs fused + graphs
#                                                              -> train_speed_roberta.{json,md}
# (a2) graphs alone on 20,000 rows, 3 epochs, bf16 (later epochs are all replays)
#                                                              -> train_speed_roberta_graphs.{json,md}
# (s) issue 4's accuracy study on all-MiniLM-L6-v2 (.bench/minilm-fp16, loaded as fp32): all
#     20,353 training rows left after 1,000 validation rows, the full test split, 1 epoch, seeds
#     0,1,2: seed recipe vs best <=1M vs full fine-tuning (HF Trainer); loraclf runs with graphs
#     when (g) passed; results written after every run      -> accuracy_minilm_gpu.{json,md,png}
# Progress, with timestamps, goes to stdout and $OUT/gpu_check.log.
# Each step has its own time limit; a failed step is logged and the next one runs.
#
# CPU smoke test (tiny sizes, this machine's venv, no wheel install; (g) with an eager stand-in
# for the capture; the graphs contenders fail: they need CUDA):
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
# Tokenizer parallelism left on (the CLI no longer turns it off)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export LORACLF_BENCH_CACHE=${LORACLF_BENCH_CACHE:-/tmp/loraclf-bench}

TRAIN=.bench/data/ag_news/train_partial.csv.gz
TEST=.bench/data/ag_news/test.csv.gz
ROBERTA=.bench/models/roberta-base
[ -f "$TRAIN" ] || TRAIN=../shared/data/ag_news/train_partial.csv.gz
[ -f "$TEST" ] || TEST=../shared/data/ag_news/test.csv.gz
[ -d "$ROBERTA" ] || ROBERTA=../shared/models/roberta-base

MINILM=.bench/minilm-fp16
[ -d "$MINILM" ] || MINILM=minilm
if [ "$SMOKE" = 1 ]; then
  G_LIMIT=300; G_ARGS=(--rows 64 --val-rows 32 --epochs 2 --standin)
  A_LIMIT=400; A_ARGS=(--rows 64 --val-rows 32 --epochs 2); A_EACH=150
  A2_LIMIT=300; A2_ARGS=(--rows 64 --val-rows 32 --epochs 2); A2_EACH=150
  S_LIMIT=900; S_ARGS=(--rows 64 --val-rows 32 --test-rows 64 --epochs 1 --seeds 0); S_EACH=300
else
  G_LIMIT=80; G_ARGS=(--rows 640 --val-rows 200 --epochs 2)
  A_LIMIT=120; A_ARGS=(--rows 4000 --val-rows 500 --epochs 3); A_EACH=70
  A2_LIMIT=70; A2_ARGS=(--rows 20000 --val-rows 500 --epochs 3); A2_EACH=65
  S_LIMIT=250; S_ARGS=(--rows -1 --val-rows 1000 --epochs 1 --seeds 0,1,2); S_EACH=120
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

# ---------------------------------------------------------------- (g) graphs == eager?
step "$G_LIMIT" "(g) CUDA graphs vs eager: same losses and adapter (fp32, dropout off)" \
  "$PY" bench/graph_check.py --model "$ROBERTA" --train "$TRAIN" --out "$OUT/graph_check.json" "${G_ARGS[@]}"

# ---------------------------------------------------------------- (a) side by side
step "$A_LIMIT" "(a) roberta-base arch train speed, 3 epochs: loraclf bf16 fused (eager) vs fused + graphs" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --precision bf16 \
  --contenders loraclf:bf16:fused,loraclf:bf16:graphs --repeats 1 --timeout "$A_EACH" \
  --name train_speed_roberta --out "$OUT/train_speed_roberta.json" "${A_ARGS[@]}"

# ---------------------------------------------------------------- (a2) graphs throughput, more rows
step "$A2_LIMIT" "(a2) roberta-base arch, CUDA graphs alone, bf16, 20,000 rows" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --precision bf16 \
  --contenders loraclf:bf16:graphs --repeats 1 --timeout "$A2_EACH" \
  --name train_speed_roberta_graphs --out "$OUT/train_speed_roberta_graphs.json" "${A2_ARGS[@]}"

# ---------------------------------------------------------------- (s) issue 4: MiniLM study, all rows
GRAPHS_OK=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(int(d['runs']['graphs']['ok'] and (d.get('loss_max_abs_diff') or 0) < 1e-3))" "$OUT/graph_check.json" 2>/dev/null || echo 0)
[ "$SMOKE" = 1 ] && GRAPHS_OK=0
LORACLF_ARGS=""
[ "$GRAPHS_OK" = 1 ] && LORACLF_ARGS="--train.cuda_graphs true"
say "(s) loraclf runs with: ${LORACLF_ARGS:-eager defaults}"
step "$S_LIMIT" "(s) accuracy study, all-MiniLM-L6-v2, all of train_partial, full test, seeds 0-2" \
  "$PY" bench/accuracy_study.py --model "$MINILM" --train "$TRAIN" --test "$TEST" --timeout "$S_EACH" \
  --loraclf-args "$LORACLF_ARGS" --name accuracy_minilm_gpu --out-dir "$OUT" "${S_ARGS[@]}"

# The device returns at most 8 files: the Markdown tables travel as one file.
for f in "$OUT"/*.md; do [ -f "$f" ] && { echo "<!-- $(basename "$f") -->"; cat "$f"; echo; }; done >"$OUT/tables.md.tmp"
rm -f "$OUT"/*.md && mv "$OUT/tables.md.tmp" "$OUT/tables.md"
say "gpu_check done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
