# Shared by the scripts that run in one device call (gpu_check.sh, mpnet_gpu.sh); sourced, not run.
# Sets OUT, SMOKE, LOG, PY, PYTHONPATH, TRAIN, TEST, ROBERTA; defines say, step, report_env,
# finish. NAME (the caller's name) names the log: $OUT/$NAME.log.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpuout}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
LOG="$OUT/${NAME:-gpu_check}.log"
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

# the machine and the versions the numbers come from, first in the log
report_env() {
  say "$NAME: SMOKE=$SMOKE OUT=$OUT python=$PY"
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
}

finish() {
  # The device returns at most 8 files: the Markdown tables travel as one file.
  for f in "$OUT"/*.md; do [ -f "$f" ] && { echo "<!-- $(basename "$f") -->"; cat "$f"; echo; }; done >"$OUT/tables.md.tmp"
  rm -f "$OUT"/*.md && mv "$OUT/tables.md.tmp" "$OUT/tables.md"
  say "$NAME done; files in $OUT:"
  ls -la "$OUT" | tee -a "$LOG"
}
