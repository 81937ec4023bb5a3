"""Where a loraclf training run spends its time: torch.profiler over a short real run.

Trains the seed recipe (configs/agnews-seed.yaml) through ``loraclf.train.train`` on a few
hundred AG News rows, under ``torch.profiler`` (CPU, and CUDA when present), and writes the
operators with the most self time, grouped into phases (forward matmuls, attention, backward,
optimizer, data collation, evaluation) to bench/results/<name>.{json,md}.

    .venv/bin/python bench/profile_train.py --model minilm --rows 512
    .venv/bin/python bench/profile_train.py --model roberta-arch --rows 256 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="minilm | roberta-arch | a model folder")
    p.add_argument("--train", default=None)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--layers", default=None, help="LoRA layers (default: the seed's that exist)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--override", nargs=2, action="append", metavar=("KEY", "VALUE"), help="extra config override")
    p.add_argument("--name", default=None)
    p.add_argument("--out-dir", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import yaml
    from torch.profiler import ProfilerActivity, profile

    from loraclf.config import load_config
    from loraclf.train import train

    if args.threads:
        torch.set_num_threads(args.threads)

    model_path, label = harness.resolve_model(args.model)
    layers = common.parse_int_list(args.layers) if args.layers else harness.seed_layers(model_path)
    work = Path(tempfile.mkdtemp(prefix="profile_", dir=harness.cache_root()))
    try:  # the prepared rows and the run are only needed until run.json is read
        data = harness.prepare_data(work / "data", harness.default_source(args.train), args.rows, 64, seed=0)
        overrides = {"model.name_or_path": model_path, "data.train": data["train"], "data.validation": data["validation"],
                     "data.test": None, "lora.layers": layers, "train.epochs": 1, "train.output_dir": str(work / "run"),
                     "train.overwrite": True, "train.precision": args.precision,
                     **{k: yaml.safe_load(v) for k, v in (args.override or [])}}
        cfg = load_config(harness.SEED_CONFIG, overrides)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        t0 = time.perf_counter()
        with profile(activities=activities, record_shapes=False) as prof:
            train(cfg)
        wall = time.perf_counter() - t0
        run = json.loads((work / "run" / "run.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = prof.key_averages()
    # On a GPU the question is whether the device or the host is the bottleneck: the host's own
    # operator time (dispatch, Python-side launches) next to the kernels' time, over the same run.
    host_ms = sum(e.self_cpu_time_total for e in events) / 1000
    device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000 if torch.cuda.is_available() else None
    top_host = [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1)}
                for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]]
    total = sum(getattr(e, device_key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, device_key), reverse=True)[: args.top]
    top = [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, device_key) / 1000, 1),
            "share": round(getattr(e, device_key) / total, 4)} for e in rows]
    phases = {"matmul (addmm/mm/bmm/linear)": ("addmm", "aten::mm", "bmm", "linear", "matmul"),
              "attention (sdpa)": ("scaled_dot_product", "flash", "_efficient_attention"),
              "backward ops": ("Backward", "backward"), "optimizer (AdamW)": ("Optimizer", "adam", "_foreach"),
              "layer_norm / gelu / dropout": ("layer_norm", "gelu", "dropout", "native_dropout"),
              "copies / casts": ("copy_", "to_copy", "_to_copy", "clone", "contiguous")}
    shares = {}
    for name, keys in phases.items():
        shares[name] = round(sum(getattr(e, device_key) for e in events
                                 if any(k.lower() in e.key.lower() for k in keys)) / total, 4)
    thr = run.get("throughput") or {}
    kernels = None
    if torch.cuda.is_available():
        # How many kernels a step launches and how big they are: a step of many tiny kernels stays
        # slow even when CUDA graphs remove the launch cost (evaluation of 64 rows is included).
        ks = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.count]
        n = sum(e.count for e in ks)
        buckets = {"<5us": 0, "5-20us": 0, "20-100us": 0, ">=100us": 0}
        for e in ks:
            mean_us = e.self_device_time_total / e.count
            key = "<5us" if mean_us < 5 else "5-20us" if mean_us < 20 else "20-100us" if mean_us < 100 else ">=100us"
            buckets[key] += e.count
        steps = run.get("optimizer_steps") or 1
        kernels = {"launches": n, "per_optimizer_step": round(n / steps, 1),
                   "kernel_ms_per_optimizer_step": round(sum(e.self_device_time_total for e in ks) / 1000 / steps, 3),
                   "launches_by_mean_duration": buckets}
    result = {"model": label, "rows": data["train_rows"], "layers": layers, "precision": run.get("precision"),
              "device": run.get("device"), "wall_s_profiled": round(wall, 2),
              "train_seconds": thr.get("train_seconds"), "train_examples_per_s": thr.get("train_examples_per_s"),
              "time_key": device_key, "phase_shares_of_op_self_time": shares, "top_ops": top,
              "host_op_ms": round(host_ms, 1), "device_kernel_ms": round(device_ms, 1) if device_ms else None,
              "top_host_ops": top_host, "cuda_kernels": kernels,
              "machine": common.machine_info(), "date": time.strftime("%Y-%m-%d")}
    name = args.name or f"profile_{args.model if args.model in ('minilm', 'roberta-arch') else Path(model_path).name}"
    out_dir = Path(args.out_dir) if args.out_dir else common.BENCH_DIR / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Profile: loraclf training, {label}", "",
          f"Machine: {result['machine']['cpu_model']}, torch threads {result['machine'].get('torch_threads')}, "
          f"GPU {result['machine'].get('gpu_name') or 'none'}. {data['train_rows']} rows, 1 epoch, LoRA layers {layers}, "
          f"precision {run.get('precision')}; training loop {thr.get('train_seconds', 0):.1f} s "
          f"({thr.get('train_examples_per_s', 0):.1f} ex/s) under the profiler (which slows it).", "",
          "Share of operator self time by kind (an op can fall in two kinds):", "",
          common.markdown_table([{"kind": k, "share": v} for k, v in shares.items()]), "",
          f"Top {args.top} operators by self time:", "", common.markdown_table(top), ""]
    if device_ms is not None:
        md += [f"Host operator self time {host_ms:,.0f} ms vs device kernel time {device_ms:,.0f} ms over the "
               f"profiled run (training loop {thr.get('train_seconds', 0) * 1000:,.0f} ms wall): a step whose "
               "kernels take much less than the wall time is waiting on the host.", "",
               f"Top {args.top} operators by host self time:", "", common.markdown_table(top_host), "",
               f"CUDA kernels: {json.dumps(kernels)}", ""]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
