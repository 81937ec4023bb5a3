#!/usr/bin/env python3
"""Carry a model that is larger than one device call to the GPU machine, in parts.

A device call carries at most 64 MiB of working tree, but files that earlier calls left in
ignored folders stay on the machine while it is warm (it goes back after ~30 s idle). So a
model of a few hundred MB (all-mpnet-base-v2: 438 MB in fp32, 219 MB in fp16) can travel as
several parts over back-to-back calls and be joined by the last one:

    # here, once: fp16 weights split into parts of <= 56 MiB, plus a folder of small files
    .venv/bin/python bench/ship_model.py pack /path/to/all-mpnet-base-v2 .ship/mpnet
    # device calls, one after another without pause (each carries one part):
    run(command="python3 bench/ship_model.py status .ship/mpnet", carry=[".ship/mpnet/part-0"])
    ...
    run(command="python3 bench/ship_model.py unpack .ship/mpnet .bench/mpnet-fp16 && ...",
        carry=[".ship/mpnet/part-3", ".ship/mpnet/meta", ...])

``pack`` needs torch and safetensors (here); ``status`` and ``unpack`` only the standard
library, so they run before anything is installed there. ``unpack`` checks every part's size and
SHA-256 against the manifest (together they pin down the whole file) and refuses, naming the
missing or damaged parts, rather than leave a truncated model that would fail later with a
confusing error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
# Tokenizer and config files a transformers model folder needs; everything else (README,
# sentence-transformers pooling configs) stays behind.
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spm.model")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(src: Path, dest: Path, max_part_mib: float) -> dict:
    """Write ``dest/meta`` (small files + manifest) and ``dest/part-<i>/model.safetensors.<i>``:
    the model's floating-point weights in float16, cut into equal parts of at most max_part_mib."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = src / WEIGHTS
    if not weights.is_file():
        raise SystemExit(f"{weights}: not found (pack needs a folder with one model.safetensors)")
    if dest.exists():
        shutil.rmtree(dest)
    meta = dest / "meta"
    meta.mkdir(parents=True)
    for name in SMALL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, meta / name)
    # float16 halves the bytes; loraclf and the study load the backbone as float32 again.
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(weights).items()}
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        whole = Path(tmp) / WEIGHTS
        save_file(tensors, whole, metadata={"format": "pt"})
        size = whole.stat().st_size
        n = math.ceil(size / (max_part_mib * 2**20))
        part_size = math.ceil(size / n)
        parts = []
        with open(whole, "rb") as fh:
            for i in range(n):
                d = dest / f"part-{i}"
                d.mkdir()
                p = d / f"{WEIGHTS}.{i}"
                p.write_bytes(fh.read(part_size))
                parts.append({"path": f"part-{i}/{p.name}", "bytes": p.stat().st_size, "sha256": _sha256(p)})
        # the parts' sizes and hashes, in order, pin down the whole file: no hash of it is needed
        manifest = {"source": str(src), "weights": WEIGHTS, "bytes": size, "dtype": "float16", "parts": parts}
    (meta / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _manifest(shipped: Path) -> dict:
    path = shipped / "meta" / MANIFEST
    if not path.is_file():
        raise SystemExit(f"{path}: not found - carry {shipped / 'meta'} with the last part")
    return json.loads(path.read_text())


def check(shipped: Path, manifest: dict) -> list[str]:
    """Problems with the parts under ``shipped`` (empty when all are there and intact)."""
    problems = []
    for part in manifest["parts"]:
        p = shipped / part["path"]
        if not p.is_file():
            problems.append(f"{part['path']} missing")
        elif p.stat().st_size != part["bytes"]:
            problems.append(f"{part['path']} has {p.stat().st_size} bytes, expected {part['bytes']}")
        elif _sha256(p) != part["sha256"]:
            problems.append(f"{part['path']} SHA-256 differs")
    return problems


def unpack(shipped: Path, dest: Path) -> Path:
    """Join the parts into ``dest/model.safetensors`` next to the small files; returns dest."""
    manifest = _manifest(shipped)
    problems = check(shipped, manifest)
    if problems:
        raise SystemExit(f"{shipped}: cannot join the model: " + "; ".join(problems)
                         + " (carry the missing parts in back-to-back calls while the machine is warm)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in (shipped / "meta").iterdir():
        if f.name != MANIFEST:
            shutil.copy2(f, dest / f.name)
    tmp = dest / (WEIGHTS + ".partial")
    with open(tmp, "wb") as out:
        for part in manifest["parts"]:
            with open(shipped / part["path"], "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 24)
    tmp.replace(dest / WEIGHTS)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="split a model folder's weights (fp16) into carryable parts")
    a.add_argument("src", type=Path)
    a.add_argument("dest", type=Path)
    a.add_argument("--max-part-mib", type=float, default=56.0,
                   help="largest part; a call carries 64 MiB with the working tree and other carried paths")
    s = sub.add_parser("status", help="which parts have arrived")
    s.add_argument("shipped", type=Path)
    u = sub.add_parser("unpack", help="check and join the parts into a model folder")
    u.add_argument("shipped", type=Path)
    u.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        m = pack(args.src, args.dest, args.max_part_mib)
        print(f"{args.dest}: {len(m['parts'])} parts, {m['bytes'] / 2**20:.1f} MiB of float16 weights; carry "
              + ", ".join(f"{args.dest / Path(x['path']).parent}" for x in m["parts"]) + f" and {args.dest / 'meta'}")
    elif args.cmd == "status":
        present = sorted(str(x.relative_to(args.shipped)) for x in args.shipped.glob("part-*/*"))
        has_meta = (args.shipped / "meta" / MANIFEST).is_file()  # the last call brings it
        print(f"{args.shipped}: present {present or 'none'}"
              + (f"; missing or damaged: {check(args.shipped, _manifest(args.shipped)) or 'none'}" if has_meta else ""))
    else:
        print(f"joined into {unpack(args.shipped, args.dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
