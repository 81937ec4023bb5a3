"""Training speed: loraclf's trainer vs the seed's stack vs a tuned HF Trainer, in one invocation.

Same model, rows, recipe (configs/agnews-seed.yaml: LoRA r=12/alpha=32/dropout 0.06 on query,value
of the seed layers, AdamW 3e-4 cosine, 15 % warm-up, batch 16 x accumulation 2), seed and
machine. Every run is its own Python process (so peak RSS / CUDA memory are per contender),
and the contenders alternate, in a rotated order, ``--repeats`` times; the tables give medians
and ratios to the first loraclf contender.

Contenders (``--contenders``, comma separated), each ``name[:precision][:padN][:flag...]``:
  * ``loraclf``  - ``loraclf.train.train`` on a Config from ``load_config(configs/agnews-seed.yaml,
                   overrides)``; precision ``--precision`` unless given (fp32 | bf16 | auto);
                   ``padN`` rounds every padded batch length up to a multiple of N
                   (data.pad_to_multiple_of); flags set config keys
                   for that contender: ``compile`` (train.compile), ``cg`` (train.compile with
                   compile_mode reduce-overhead: CUDA graphs), ``graphs`` / ``eager``
                   (train.cuda_graphs true / false: loraclf's whole-step CUDA graphs, on by
                   default on a GPU), ``fused``
                   (train.fuse_accumulation), ``noprefix`` / ``prefix`` (train.cache_frozen_prefix
                   false / true), ``tokN`` (train.max_tokens_per_batch N), ``notokcache``;
  * ``seed``     - bench/baseline_trainer.py --stack seed (chunk-of-1,000 padding), fp32;
  * ``tuned``    - bench/baseline_trainer.py --stack tuned (per-batch padding, length-grouped), fp32
                   unless a precision is given (e.g. ``tuned:bf16`` on a GPU).

Reported per contender: train examples/s, real (non-pad) tokens/s, padded tokens/s, seconds per
epoch (time in the training loop / Trainer.train()), optimizer steps, validation accuracy after
them, peak RSS, CUDA max allocated; for loraclf also the per-step timeline (median seconds per
optimizer step in the first and last quarter of the steps, and the RSS at the end).

Examples:

    .venv/bin/python bench/train_speed.py --model minilm --rows 1024 --epochs 1 --repeats 2
    .venv/bin/python bench/train_speed.py --model roberta-arch --rows 256 --contenders loraclf,tuned
    .venv/bin/python bench/train_speed.py --model minilm --rows 512 --epochs 2 \\
        --contenders loraclf:fp32,loraclf:bf16,loraclf:bf16:pad8,loraclf:bf16:pad16 --name cpu_precision
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402
from harness import log  # noqa: E402

HERE = Path(__file__).resolve()


# =========================================================================== contenders
# loraclf contender flags (e.g. loraclf:bf16:compile:fused): config overrides for that contender only
LORACLF_FLAGS = {
    "compile": {"train.compile": True},
    # CUDA graphs (torch.compile mode reduce-overhead): one graph recorded per batch shape
    "cg": {"train.compile": True, "train.compile_mode": "reduce-overhead"},
    "fused": {"train.fuse_accumulation": True},
    "graphs": {"train.cuda_graphs": True},
    "eager": {"train.cuda_graphs": False},
    "noprefix": {"train.cache_frozen_prefix": False},
    "prefix": {"train.cache_frozen_prefix": True},
    "notokcache": {"data.token_cache": False},
}

def parse_contender(spec: str, default_precision: str) -> dict[str, Any]:
    parts = spec.strip().split(":")
    name = parts[0]
    if name not in ("loraclf", "seed", "tuned"):
        raise SystemExit(f"unknown contender {spec!r} (loraclf | seed | tuned)[:precision][:padN][:flag...]")
    c: dict[str, Any] = {"name": name, "precision": None, "pad_multiple": None, "overrides": {}}
    for p in parts[1:]:
        if p in ("fp32", "bf16", "auto", "fp16"):
            c["precision"] = p
        elif name != "loraclf":
            raise SystemExit(f"{spec}: {p!r} applies to loraclf only")
        elif p.startswith("pad") and p[3:].isdigit():
            c["pad_multiple"] = int(p[3:])
            c["overrides"]["data.pad_to_multiple_of"] = int(p[3:])
        elif p.startswith("tok") and p[3:].isdigit():
            c["overrides"]["train.max_tokens_per_batch"] = int(p[3:])
        elif p in LORACLF_FLAGS:
            c["overrides"].update(LORACLF_FLAGS[p])
        else:
            raise SystemExit(f"cannot parse {p!r} in contender {spec!r}")
    if c["precision"] is None:
        c["precision"] = default_precision if name == "loraclf" else "fp32"
    if name != "loraclf" and c["precision"] == "auto":
        raise SystemExit(f"{spec}: the HF Trainer takes fp32 | bf16 | fp16")
    c["label"] = spec.strip() if ":" in spec else (f"{name}:{c['precision']}")
    return c


# =========================================================================== loraclf worker
def _install_pad_wrapper() -> Any:
    """Wrap loraclf.train's collators to count real/padded tokens and the shapes of every training
    batch (rounding to a multiple is loraclf's own data.pad_to_multiple_of, set as an override)."""
    import loraclf.train as lt

    counts = {"real": 0, "total": 0, "batches": 0, "shapes": set()}

    def count(out):
        counts["real"] += out["n_tokens"]
        counts["total"] += int(out["input_ids"].numel())
        counts["batches"] += 1
        counts["shapes"].add(tuple(out["input_ids"].shape))
        return out

    class BenchPadCollator(lt.PadCollator):  # type: ignore[misc, valid-type]
        def __call__(self, items):
            return count(super().__call__(items))

    class BenchPrefixCollator(lt.PrefixCollator):  # the frozen-prefix path's collator, counted alike
        def __call__(self, items):
            return count(super().__call__(items))

    lt.PadCollator = BenchPadCollator
    lt.PrefixCollator = BenchPrefixCollator
    return counts


class _Timeline:
    """train() callback: wall time and RSS at every optimizer step, epoch boundaries marked."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, float]] = []  # (step, t, rss)
        self.evals: list[tuple[int, float]] = []
        self.t0 = time.perf_counter()

    def on_start(self, total_steps, info):
        self.total_steps = total_steps
        self.info = info
        self.t_start = time.perf_counter()

    def on_step(self, step, record):
        self.steps.append((step, time.perf_counter(), harness.rss_now_mib()))

    def on_eval(self, record):
        self.evals.append((int(record.get("step", 0)), time.perf_counter()))

    def step_durations(self) -> list[float]:
        """Seconds per optimizer step, skipping the first step after an evaluation (and the very
        first step, which includes the first batch's collation and one-off setup)."""
        out = []
        eval_steps = {s for s, _ in self.evals}
        prev_t = None
        prev_step = None
        for step, t, _ in self.steps:
            if prev_t is not None and step == prev_step + 1 and prev_step not in eval_steps:
                out.append(t - prev_t)
            prev_t, prev_step = t, step
        return out


def loraclf_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from loraclf.config import load_config
    from loraclf.train import train

    counts = _install_pad_wrapper()
    overrides = {
        "model.name_or_path": spec["model_path"],
        "data.train": spec["train"],
        "data.validation": spec["validation"],
        "data.test": spec.get("test"),
        "lora.layers": spec["layers"],
        "train.epochs": spec["epochs"],
        "train.output_dir": spec["run_dir"],
        "train.overwrite": True,
        "train.precision": spec["precision"],
        "train.seed": spec["seed"],
        **spec.get("overrides", {}),
    }
    cfg = load_config(spec.get("config") or harness.SEED_CONFIG, overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tl = _Timeline()
    with common.Timer() as t_all:
        result = train(cfg, callback=tl)
    run = json.loads((Path(spec["run_dir"]) / "run.json").read_text())
    thr = run.get("throughput") or {}
    train_s = float(thr.get("train_seconds") or 0.0)
    epochs_done = len([r for r in result.records if r.get("event") == "eval" and r.get("split") == "validation"])
    vals = [r for r in result.records if r.get("event") == "eval" and r.get("split") == "validation"]
    mem = common.peak_memory()
    durs = tl.step_durations()
    q = max(1, len(durs) // 4)
    train_rows = (run.get("rows") or {}).get("train")
    later_s = _median([r.get("train_seconds") for r in vals[1:]]) if len(vals) > 1 else None
    examples = (thr.get("train_examples_per_s") or 0) * train_s
    rec = {
        "contender": spec["label"],
        "stack": "loraclf",
        "precision_requested": spec["precision"],
        "precision": run.get("precision"),
        "pad_multiple": spec.get("pad_multiple"),
        "device": run.get("device"),
        "train_rows": train_rows,
        "val_rows": (run.get("rows") or {}).get("validation"),
        "epochs_done": epochs_done,
        "optimizer_steps": run.get("optimizer_steps"),
        "examples_seen": round(examples),
        "train_s": round(train_s, 3),
        "seconds_per_epoch": round(train_s / epochs_done, 3) if epochs_done else None,
        "train_examples_per_s": round(thr.get("train_examples_per_s") or 0, 2),
        "real_tokens_per_s": round(thr.get("train_tokens_per_s") or 0, 1),
        "total_tokens_per_s": round(counts["total"] / train_s, 1) if train_s else None,
        "real_tokens": counts["real"],
        "total_tokens": counts["total"],
        "pad_fraction": round(1 - counts["real"] / counts["total"], 4) if counts["total"] else None,
        "distinct_batch_shapes": len(counts["shapes"]),
        "val_accuracy": round(vals[-1]["accuracy"], 4) if vals else None,
        "best_val_accuracy": round(result.validation.get("accuracy"), 4) if result.validation else None,
        "test_accuracy": round(result.test["accuracy"], 4) if result.test else None,
        "peak_rss_mib": mem["peak_rss_mib"],
        "rss_end_of_training_mib": round(tl.steps[-1][2], 1) if tl.steps else None,
        "cuda_max_allocated_mib": mem.get("cuda_max_allocated_mib"),
        "s_per_step_first_quarter": round(_median(durs[:q]), 4) if durs else None,
        "s_per_step_last_quarter": round(_median(durs[-q:]), 4) if durs else None,
        "s_per_step_median": round(_median(durs), 4) if durs else None,
        # per-epoch training-loop seconds (epoch 1 includes the frozen-prefix cache, when there is one)
        "epoch_seconds": [r.get("train_seconds") for r in vals],
        "first_epoch_s": vals[0].get("train_seconds") if vals else None,
        "later_epoch_s": later_s,
        "later_epoch_examples_per_s": round(train_rows / later_s, 1) if later_s and train_rows else None,
        "epoch_eval_seconds": [r.get("eval_seconds") for r in vals],  # validation after each epoch
        "frozen_prefix_layers": thr.get("frozen_prefix_layers"),
        "prefix_cache_s": thr.get("prefix_cache_seconds"),
        "train_call_wall_s": round(t_all.seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "trainable_params": result.trainable_params,
        "run_dir": spec["run_dir"] if spec.get("keep_run") else None,
    }
    return rec


def _median(xs):
    return harness.median(xs)


# =========================================================================== orchestration
def contender_cmd(c: dict[str, Any], args, data: dict[str, Any], model_path: str, layers: list[int],
                  work: Path, tag: str, keep_run: bool = False) -> tuple[list[str], Path]:
    out = work / f"{tag}.json"
    if out.exists():
        out.unlink()
    if c["name"] == "loraclf":
        spec = {
            "label": c["label"], "model_path": model_path, "train": data["train"], "validation": data["validation"],
            "test": args.test, "layers": layers, "epochs": args.epochs, "precision": c["precision"],
            "pad_multiple": c["pad_multiple"], "seed": args.seed, "threads": args.threads,
            "run_dir": str(work / f"run-{tag}"), "keep_run": keep_run,
            "overrides": {**dict(args.override or []), **c["overrides"]},
        }
        spec_path = work / f"{tag}.spec.json"
        spec_path.write_text(json.dumps(spec))
        return [sys.executable, str(HERE), "--worker", str(spec_path), "--worker-out", str(out)], out
    cmd = [
        sys.executable, str(common.BENCH_DIR / "baseline_trainer.py"), "--stack", c["name"],
        "--model", model_path, "--train", data["train"], "--val-from", data["validation"], "--val-rows", "-1",
        "--epochs", str(args.epochs), "--layers", ",".join(map(str, layers)), "--precision", c["precision"],
        "--seed", str(args.seed), "--out", str(out), "--name", tag,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd, out


SUMMARY_KEYS = [
    "train_examples_per_s", "real_tokens_per_s", "total_tokens_per_s", "pad_fraction", "seconds_per_epoch",
    "train_s", "optimizer_steps", "val_accuracy", "peak_rss_mib", "cuda_max_allocated_mib",
    "s_per_step_first_quarter", "s_per_step_last_quarter", "rss_end_of_training_mib", "distinct_batch_shapes",
    "first_epoch_s", "later_epoch_s", "later_epoch_examples_per_s", "prefix_cache_s",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="minilm", help="minilm | roberta-arch | a model folder (no weights: random)")
    p.add_argument("--train", default=None, help="canonical AG News CSV[.gz] (default: shared train_partial)")
    p.add_argument("--rows", type=int, default=1024, help="training rows (-1: all after validation)")
    p.add_argument("--val-rows", type=int, default=500, help="validation rows (held out of --train or from --val-from)")
    p.add_argument("--val-from", default=None, help="take validation rows from this CSV (e.g. the test file)")
    p.add_argument("--test", default=None, help="loraclf only: also evaluate on this file (data.test)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "auto", "bf16"],
                   help="loraclf's precision where a contender names none (baselines: fp32 unless named)")
    p.add_argument("--contenders", default="loraclf,seed,tuned")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", default=None, help="comma list (default: seed layers that exist: 0,1,5[,10,11])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    p.add_argument("--override", nargs=2, action="append", metavar=("KEY", "YAML"),
                   help="extra loraclf config override, e.g. --override train.batch_size 32 (loraclf only)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per contender run")
    p.add_argument("--keep-run", default=None, help="copy the last loraclf run directory here (for infer_speed --run)")
    p.add_argument("--name", default=None, help="result name (default train_speed_<model>)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json; .md beside it)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.override:
        import yaml

        args.override = [(k, yaml.safe_load(v)) for k, v in args.override]
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        rec = loraclf_worker(spec)
        Path(args.worker_out).write_text(json.dumps({"results": [rec]}, indent=2, default=str))
        return rec

    contenders = [parse_contender(s, args.precision) for s in args.contenders.split(",") if s.strip()]
    model_path, model_label = harness.resolve_model(args.model, args.seed)
    layers = common.parse_int_list(args.layers) if args.layers else harness.seed_layers(model_path)
    work = Path(tempfile.mkdtemp(prefix="train_speed_", dir=harness.cache_root()))
    source = harness.default_source(args.train)
    data = harness.prepare_data(work / "data", source, args.rows, args.val_rows, args.seed, args.val_from)
    log(f"train_speed: {model_label} ({model_path}), layers {layers}, {data['train_rows']} train / "
        f"{data['val_rows']} validation rows, {args.epochs} epoch(s), contenders "
        f"{[c['label'] for c in contenders]}, {args.repeats} repeat(s); work dir {work}")

    # ------------------------------------------------------------------ summary
    def write(partial: bool = False) -> tuple[Path, Path, list]:
        """The JSON and Markdown results of the runs so far: written after every contender too,
        so that a step cut short by its time limit still returns what it measured."""
        ref = next((c["label"] for c in contenders if c["name"] == "loraclf"), contenders[0]["label"])
        table = []
        for c in contenders:
            mine = [r for r in runs if r["contender"] == c["label"]]
            s = harness.summarize(mine, SUMMARY_KEYS)
            table.append({"contender": c["label"], "runs": s.pop("n"), "failed": s.pop("failed"), **s})
        ref_row = next(t for t in table if t["contender"] == ref)
        for t in table:
            a, b = ref_row.get("train_examples_per_s"), t.get("train_examples_per_s")
            t[f"{ref}_speedup"] = round(a / b, 2) if a and b else None
        machine = common.machine_info()
        if args.threads:
            machine["torch_threads"] = args.threads
        # paired ratios per repeat (same repeat = closest in time), then their median
        paired = {}
        for c in contenders:
            if c["label"] == ref:
                continue
            rs = []
            for rep in range(args.repeats):
                a = next((r for r in runs if r["contender"] == ref and r["repeat"] == rep and "error" not in r), None)
                b = next((r for r in runs if r["contender"] == c["label"] and r["repeat"] == rep and "error" not in r), None)
                if a and b and b.get("train_examples_per_s"):
                    rs.append(a["train_examples_per_s"] / b["train_examples_per_s"])
            paired[c["label"]] = {"per_repeat": [round(x, 3) for x in rs], "median": round(harness.median(rs), 3) if rs else None}
        name = args.name or f"train_speed_{args.model if args.model in ('minilm', 'roberta-arch') else Path(model_path).name}"
        settings = {"model": model_label, "model_path": model_path, "layers": layers, "epochs": args.epochs,
                    "train_rows": data["train_rows"], "val_rows": data["val_rows"], "seed": args.seed,
                    "repeats": args.repeats, "data": source, "val_source": data["val_source"],
                    "recipe": "configs/agnews-seed.yaml (r=12, alpha=32, dropout 0.06, query+value, AdamW 3e-4 cosine, "
                              "warm-up 0.15, batch 16 x accumulation 2)", "overrides": dict(args.override or [])}
        notes = (
            f"Model {model_label}, LoRA layers {layers}, {data['train_rows']} training rows, {data['val_rows']} validation "
            f"rows, {args.epochs} epoch(s), seed {args.seed}; medians of {args.repeats} alternating repeat(s), each run in "
            f"its own process. `{ref}_speedup` = {ref}'s median examples/s over the row's; paired per-repeat ratios: "
            + "; ".join(f"{k}: {v['per_repeat']} (median {v['median']})" for k, v in paired.items())
            + ". val_accuracy is after the same number of optimizer steps (last epoch). Times are the training loop only "
            "(loraclf: run.json throughput.train_seconds; HF: Trainer.train()), not model loading or evaluation.\n"
        )
        if partial:
            notes = f"PARTIAL: the {len(runs)} run(s) done so far; the script had not finished. " + notes
        columns = ["contender", "runs", "train_examples_per_s", "real_tokens_per_s", "total_tokens_per_s", "pad_fraction",
                   "seconds_per_epoch", "optimizer_steps", "val_accuracy", "peak_rss_mib", "cuda_max_allocated_mib",
                   "s_per_step_first_quarter", "s_per_step_last_quarter", "first_epoch_s", "later_epoch_s",
                   "later_epoch_examples_per_s",
                   f"{ref}_speedup"]
        payload_records = [{**t, "settings": settings, "paired_ratios": paired.get(t["contender"])} for t in table]
        jp, mp = common.write_results(name, payload_records, columns, title=f"Training speed: {model_label}",
                                      notes=notes, machine=machine, json_path=args.out)
        # the raw runs beside the summary
        raw = json.loads(jp.read_text())
        raw["runs"] = runs
        jp.write_text(json.dumps(raw, indent=2, default=str) + "\n")
        return jp, mp, table

    runs: list[dict[str, Any]] = []
    last_loraclf_run = None
    for rep in range(args.repeats):
        for c in harness.rotate(contenders, rep):
            tag = f"{c['label'].replace(':', '-')}-r{rep}"
            keep = args.keep_run is not None and c["name"] == "loraclf"
            cmd, out = contender_cmd(c, args, data, model_path, layers, work, tag, keep_run=keep)
            log(f"repeat {rep + 1}/{args.repeats}: {c['label']} ...")
            rec = harness.run_worker(cmd, out, args.timeout, args.threads, label=c["label"])
            rec.update(contender=c["label"], repeat=rep)
            runs.append(rec)
            if "error" not in rec:
                log(f"  {c['label']}: {rec.get('train_examples_per_s')} ex/s, {rec.get('real_tokens_per_s')} real tok/s, "
                    f"{rec.get('seconds_per_epoch')} s/epoch, {rec.get('optimizer_steps')} steps, "
                    f"val acc {rec.get('val_accuracy')}, peak RSS {rec.get('peak_rss_mib')} MiB"
                    + (f", CUDA {rec.get('cuda_max_allocated_mib')} MiB" if rec.get("cuda_max_allocated_mib") else ""))
                if keep:
                    last_loraclf_run = work / f"run-{tag}"
                    # kept at once: a later contender cut by the time limit must not cost the next step its run
                    dest = Path(args.keep_run)
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(last_loraclf_run, dest)
                    log(f"kept the loraclf run in {dest}")
            if c["name"] == "loraclf" and not keep:
                shutil.rmtree(work / f"run-{tag}", ignore_errors=True)
            write(partial=True)

    jp, mp, table = write()
    shutil.rmtree(work, ignore_errors=True)
    print(mp.read_text())
    log(f"wrote {jp} and {mp}")
    return {"table": table, "runs": runs}


if __name__ == "__main__":
    main()
