#!/usr/bin/env bash
# One GPU check for issue 3, to run in a single device call (about 8.5 minutes; step limits add
# up to 490 s, after ~20 s of wheel installs and environment report):
#
#   run(command="bash bench/gpu_check.sh", carry=[".bench"], timeout_s=570)
#
# after building .bench/ here (absent from a fresh clone): bash bench/prepare_bench.sh
#
# GPU check 4 (H200, 2026-11-29, BENCHMARKS.md) settled what the earlier version of this script
# asked: graphed training draws the same dropout masks as eager (losses and adapter identical),
# compiled layers inside the graphs buy 1.21x in later epochs for ~88 s of compilation (off), and
# inference graphs are 3.5-3.9x the eager forward (now the default on a GPU). Those steps are gone.
# What is left open: how the ~5.7 ms of a replayed 32-row training step split among its ~950
# kernels (the profile so far was of the eager step), and the numbers again at the defaults.
# On the roberta-base architecture (random weights from .bench/models/roberta-base: its FLOPs) and
# AG News rows from .bench/data/ag_news:
# (a) side by side, 4,000 rows, 3 epochs, bf16, seed recipe: loraclf default (graphs), loraclf eager
#     (train.cuda_graphs false, fused), tuned HF Trainer bf16 -> train_speed_roberta.{json,md}
# (a2) the default alone on 20,000 rows, 3 epochs: the later-epoch rate at the size the 12,000
#     examples/s target is about                        -> train_speed_roberta_20k.{json,md}
# (b) kernel census of the *graphed* step (train.cuda_graphs true: an error, not a silent eager
#     fallback, if the capture fails under the profiler): kernels per step and kernel ms per step,
#     which with graphs is the GPU's share of the step   -> profile_gpu_roberta_graphs.{json,md}
#     Read its kernel times with care: CUPTI mistimes kernels replayed from graphs before CUDA 13.1
#     update 1 (pytorch/kineto#1165; GPU check 4's torch was built for CUDA 13.0), and its counts
#     mix the eager warm-up steps and evaluation with the replays.
# (c) inference on (a)'s run: loraclf predict's default on a GPU (bf16 weights + inference graphs),
#     its eager forward, and pipeline at batch 1, 32, 256, each timed twice in its process (cold:
#     first sight of every batch shape; warm: a server's steady state)
#     (target >= 25,000 examples/s)                     -> infer_speed_roberta.{json,md}
# (d) the host's share of a prediction on this machine's CPUs: Predictor.predict with a model that
#     costs ~nothing (bench/host_cost.py), phase by phase: the ceiling the host puts on (c)
#     (the eager path's phases: the graphed path's input copies, clone and lock are not in it)
#                                                       -> host_cost_gpu_machine.{json,md}
# Progress, with timestamps, goes to stdout and $OUT/gpu_check.log.
# Each step has its own time limit; a failed step is logged and the next one runs.
#
# CPU smoke test (tiny sizes, this machine's venv, no wheel install; graphs need CUDA, so on a CPU
# (b) profiles the eager step and (c)'s graphs contender fails by design):
#   SMOKE=1 OUT=/tmp/gpuout bash bench/gpu_check.sh
NAME=gpu_check
source "$(dirname "$0")/gpu_lib.sh"

if [ "$SMOKE" = 1 ]; then
  A_LIMIT=500; A_ARGS=(--rows 64 --val-rows 32 --epochs 2); A_EACH=150
  A2_LIMIT=200; A2_ARGS=(--rows 96 --val-rows 32 --epochs 2)
  B_LIMIT=200; B_ARGS=(--rows 64); B_GRAPHS=false
  C_LIMIT=400; C_ARGS=(--rows 64 --rows-bs1 4 --batch-sizes 1,32)
  D_LIMIT=200; D_ARGS=(--rows 256 --repeats 2)
else
  A_LIMIT=190; A_ARGS=(--rows 4000 --val-rows 500 --epochs 3); A_EACH=90
  A2_LIMIT=75; A2_ARGS=(--rows 20000 --val-rows 500 --epochs 3)
  B_LIMIT=60; B_ARGS=(--rows 800); B_GRAPHS=true
  C_LIMIT=125; C_ARGS=(--rows 4000 --rows-bs1 64 --batch-sizes 1,32,256)  # took 109 s in GPU check 4
  D_LIMIT=40; D_ARGS=(--rows 4000 --repeats 3)
fi

report_env

# ---------------------------------------------------------------- (a) side by side
RUN_A=${LORACLF_BENCH_CACHE}/gpu-roberta-run
step "$A_LIMIT" "(a) roberta-base arch train speed, 3 epochs: loraclf default (graphs), loraclf eager, tuned Trainer bf16" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --precision bf16 \
  --contenders loraclf:bf16,loraclf:bf16:eager,tuned:bf16 --repeats 1 \
  --keep-run "$RUN_A" --timeout "$A_EACH" --name train_speed_roberta --out "$OUT/train_speed_roberta.json" "${A_ARGS[@]}"

# ---------------------------------------------------------------- (a2) the default at 20,000 rows
step "$A2_LIMIT" "(a2) roberta-base arch, loraclf default (graphs), 20,000 rows, 3 epochs" \
  "$PY" bench/train_speed.py --model "$ROBERTA" --train "$TRAIN" --precision bf16 \
  --contenders loraclf:bf16 --repeats 1 --timeout $((A2_LIMIT - 5)) \
  --name train_speed_roberta_20k --out "$OUT/train_speed_roberta_20k.json" "${A2_ARGS[@]}"

# ---------------------------------------------------------------- (b) kernel census of the graphed step
step "$B_LIMIT" "(b) profile of the step (graphs: $B_GRAPHS): kernels per step, their sizes" \
  "$PY" bench/profile_train.py --model "$ROBERTA" --train "$TRAIN" --precision bf16 \
  --override train.fuse_accumulation true --override train.cuda_graphs "$B_GRAPHS" --override data.pad_to_multiple_of 16 \
  --name profile_gpu_roberta_graphs --out-dir "$OUT" "${B_ARGS[@]}"

# ---------------------------------------------------------------- (c) inference on (a)'s run
if [ -f "$RUN_A/run.json" ]; then
  step "$C_LIMIT" "(c) roberta-base arch inference: loraclf bf16 (eager, graphs) vs pipeline" \
    "$PY" bench/infer_speed.py --run "$RUN_A" --test "$TEST" --contenders loraclf:bf16,loraclf:bf16:graphs,pipeline \
    --repeats 1 --process-per contender --agreement-rows 0 --warm-pass --timeout $((C_LIMIT - 10)) \
    --name infer_speed_roberta --out "$OUT/infer_speed_roberta.json" "${C_ARGS[@]}"
else
  say "(c) skipped: no run from (a)"
fi

# ---------------------------------------------------------------- (d) the host's share of a prediction
step "$D_LIMIT" "(d) host cost of Predictor.predict on this machine's CPUs (model cost ~0)" \
  "$PY" bench/host_cost.py --tokenizer "$ROBERTA" --test "$TEST" --batch-sizes 32,256 \
  --out "$OUT/host_cost_gpu_machine.json" "${D_ARGS[@]}"

finish
