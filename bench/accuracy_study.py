"""Accuracy per trainable parameter: the seed recipe vs the best <=1M recipe vs full fine-tuning.

Issue 4's study. Same training rows, same validation rows, same epochs and the full official
test split for every method; several seeds; each method at its own learning rate:

  * ``seed`` - configs/agnews-seed.yaml as is (LoRA r=12 on query/value of the seed's layers
    that exist, the model's own head, lr 3e-4), trained by ``loraclf train``;
  * ``best`` - ``loraclf plan --config configs/agnews-best.yaml --budget B --write``: the
    planner's top pick *for this backbone* (linear head, LoRA on every linear layer of every
    block at the largest rank that fits), trained by ``loraclf train`` with agnews-best's recipe;
  * ``full`` - full fine-tuning of the same backbone (every weight trained, no LoRA) with the
    HF Trainer (``bench/baseline_trainer.py --full``: per-batch padding, AdamW, cosine, lr 5e-5
    unless --full-lr), last epoch evaluated. loraclf has no full fine-tuning mode: it exists to
    stay inside a budget.

loraclf runs keep the epoch with the best validation accuracy (its default); the Trainer run
is evaluated after its last epoch. Every run is its own process, the methods alternate.

Writes bench/results/<name>.json, .md and .png (test accuracy against trainable parameters).

    .venv/bin/python bench/accuracy_study.py --model minilm --rows 4000 --epochs 3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402

BEST_CONFIG = common.REPO_ROOT / "configs" / "agnews-best.yaml"
LORACLF = [sys.executable, "-m", "loraclf.cli"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="minilm | a model folder with weights | hub id")
    p.add_argument("--train", default=None, help="canonical AG News CSV (default: shared train_partial.csv.gz)")
    p.add_argument("--test", default=None, help="test CSV (default: shared test.csv.gz, all 7,600 rows)")
    p.add_argument("--rows", type=int, default=-1, help="training rows (-1: all that remain after validation)")
    p.add_argument("--val-rows", type=int, default=1000, help="validation rows carved from --train")
    p.add_argument("--test-rows", type=int, default=-1, help="test rows (-1: all)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="seed,best,full")
    p.add_argument("--budget", type=int, default=1_000_000)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--full-precision", choices=["fp32", "bf16"], default="fp32",
                   help="the Trainer's precision for full fine-tuning (bf16: mixed precision, for GPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    p.add_argument("--name", default=None, help="result name (default accuracy_<model>)")
    p.add_argument("--out-dir", default=None, help="where results go (default bench/results)")
    p.add_argument("--method-config", action="append", default=[], metavar="NAME=YAML",
                   help="an extra method trained by loraclf from this config (e.g. a `loraclf plan --write` pick); "
                   "name it in --methods")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="write one study from the results of several partial ones (same model, rows, epochs; e.g. "
                   "seeds run in separate GPU calls) instead of training")
    p.add_argument("--merge-source", default=None, help="with --merge: the training CSV, where the parts did not record it")
    p.add_argument("--loraclf-args", default="",
                   help="extra 'loraclf train' arguments for the seed and best methods, e.g. '--train.cuda_graphs true'")
    return p.parse_args(argv)


def _run(cmd: list[str], threads: int | None, timeout: float | None, label: str) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=harness.worker_env(threads), cwd=str(common.REPO_ROOT), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, f"timed out after {timeout}s"
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        harness.log(f"  {label}: exit {proc.returncode}: {tail[-1] if tail else ''}")
        return False, wall, tail[-1] if tail else f"exit {proc.returncode}"
    return True, wall, ""


def loraclf_run(config: Path, model: str, data: dict[str, Any], test: str, epochs: int, seed: int,
                run_dir: Path, extra: list[str], threads: int | None, timeout: float | None,
                label: str) -> dict[str, Any]:
    cmd = [*LORACLF, "train", "--config", str(config), "--quiet",
           "--model.name_or_path", model, "--data.train", data["train"], "--data.validation", data["validation"],
           "--data.test", test, "--train.epochs", str(epochs), "--train.seed", str(seed),
           "--train.output_dir", str(run_dir), "--train.overwrite", "true", *extra]
    ok, wall, err = _run(cmd, threads, timeout, label)
    if not ok:
        return {"error": err, "wall_s": round(wall, 1)}
    info = json.loads((run_dir / "run.json").read_text())
    test_m = info["metrics"]["test"]
    return {"test_accuracy": test_m["accuracy"], "test_macro_f1": test_m["macro_f1"],
            "val_accuracy": info["metrics"]["validation"]["accuracy"], "best_epoch": info["best_epoch"],
            "trainable_params": info["params"]["trainable"], "precision": info["precision"],
            "train_examples_per_s": info["throughput"]["train_examples_per_s"], "wall_s": round(wall, 1)}


def full_run(model: str, data: dict[str, Any], test: str, test_rows: int, epochs: int, seed: int, lr: float,
             precision: str, out: Path, threads: int | None, timeout: float | None, label: str) -> dict[str, Any]:
    cmd = [sys.executable, str(common.BENCH_DIR / "baseline_trainer.py"), "--full", "--stack", "tuned",
           "--model", model, "--train", data["train"], "--val-from", test, "--val-rows", str(test_rows),
           "--epochs", str(epochs), "--seed", str(seed), "--lr", str(lr), "--warmup", "0.06",
           "--precision", precision, "--fix-ga-loss", "--out", str(out), "--name", out.stem,
           "--predictions-out", str(out.with_suffix(".predictions.tsv"))]
    ok, wall, err = _run(cmd, threads, timeout, label)
    if not ok:
        return {"error": err, "wall_s": round(wall, 1)}
    rec = json.loads(out.read_text())
    rec = rec["results"][0] if "results" in rec else rec
    return {"test_accuracy": rec["val_accuracy"], "test_macro_f1": None, "val_accuracy": None,
            "best_epoch": epochs, "trainable_params": rec["trainable_params"], "precision": rec["precision"],
            "train_examples_per_s": rec["train_examples_per_s"], "wall_s": round(wall, 1)}


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def plot(summary: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in summary:
        if s["mean_accuracy"] is None:
            continue
        ax.errorbar([s["trainable_params"]], [100 * s["mean_accuracy"]], yerr=[100 * (s["std_accuracy"] or 0)],
                    fmt="o", capsize=4, label=f"{s['method']} ({s['trainable_params']:,})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge(args: argparse.Namespace) -> None:
    """One study from several partial result files: runs concatenated, settings checked equal."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    same = ("model", "model_path", "train_rows", "val_rows", "test_rows", "epochs", "budget", "full_lr",
            "full_precision", "loraclf_args")
    for part in parts:  # written before --full-precision existed: fp32
        part.setdefault("full_precision", "fp32")
    for f, part in zip(args.merge[1:], parts[1:]):
        differ = [k for k in same if part.get(k) != parts[0].get(k)]
        if differ:
            raise SystemExit(f"{f}: {', '.join(differ)} differ from {args.merge[0]}; these results do not merge")
    first = parts[0]
    for k in ("epochs", "test_rows", "budget", "full_lr", "full_precision", "threads", "loraclf_args"):
        setattr(args, k, first.get(k))
    runs = sorted((r for part in parts for r in part["runs"]), key=lambda r: r["seed"])
    seeds = sorted({r["seed"] for r in runs})
    methods = list(dict.fromkeys(r["method"] for part in parts for r in part["runs"]))
    data = {"train_rows": first["train_rows"], "val_rows": first["val_rows"],
            "source": args.merge_source or first.get("source")}
    name = args.name or first["name"]
    md = write_results(args, name, first["model"], first["model_path"], data, first["test"], seeds, methods, runs,
                       machine=first["machine"], merged_from=[Path(f).name for f in args.merge])
    print("\n".join(md))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    model, label = harness.resolve_model(args.model)
    test = args.test or str(common.default_test_csv())
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    name = args.name or f"accuracy_{args.model if args.model == 'minilm' else Path(model).name}"
    work = harness.cache_root() / f"study-{name}"
    data = harness.prepare_data(work / "data", harness.default_source(args.train), args.rows if args.rows >= 0 else None,
                                args.val_rows, seed=0)
    test_path = test
    if args.test_rows >= 0:  # a stated subset of the test split, the same rows for every method
        harness._write_rows(work / "data" / "test.csv", harness.read_raw_ag_news(test)[: args.test_rows])
        test_path = str(work / "data" / "test.csv")
    harness.log(f"{label}: {data['train_rows']} train / {data['val_rows']} validation rows, test {test_path}")

    best_cfg = work / "best.yaml"
    if "best" in methods:
        ok, _, err = _run([*LORACLF, "plan", "--config", str(BEST_CONFIG), "--model.name_or_path", model,
                           "--budget", str(args.budget), "--write", str(best_cfg)], args.threads, None, "plan")
        if not ok:
            raise SystemExit(f"loraclf plan failed: {err}")
    layers = json.dumps(harness.seed_layers(model))
    # the seed recipe's query/value under this architecture's module names (MPNet: q, v)
    model_type = json.loads((Path(model) / "config.json").read_text()).get("model_type") if Path(model).is_dir() else None
    from baseline_trainer import DEFAULT_TARGETS

    seed_targets = json.dumps(DEFAULT_TARGETS.get(model_type, ["query", "value"]))

    extra = shlex.split(args.loraclf_args)
    method_configs = dict(m.split("=", 1) for m in args.method_config)
    runs: list[dict[str, Any]] = []
    for i, seed in enumerate(seeds):
        for method in harness.rotate(methods, i):
            tag = f"{method}-seed{seed}"
            harness.log(f"{tag} ...")
            if method == "seed":
                rec = loraclf_run(harness.SEED_CONFIG, model, data, test_path, args.epochs, seed, work / tag,
                                  ["--lora.layers", layers, "--lora.target_modules", seed_targets, *extra],
                                  args.threads, args.timeout, tag)
            elif method == "best":
                rec = loraclf_run(best_cfg, model, data, test_path, args.epochs, seed, work / tag, extra,
                                  args.threads, args.timeout, tag)
            elif method in method_configs:
                rec = loraclf_run(Path(method_configs[method]), model, data, test_path, args.epochs, seed, work / tag,
                                  extra, args.threads, args.timeout, tag)
            elif method == "full":
                rec = full_run(model, data, test_path, args.test_rows, args.epochs, seed, args.full_lr,
                               args.full_precision, work / f"{tag}.json", args.threads, args.timeout, tag)
            else:
                raise SystemExit(f"unknown method {method!r} (seed | best | full | a --method-config name)")
            rec.update(method=method, seed=seed)
            runs.append(rec)
            harness.log(f"  {tag}: " + ", ".join(f"{k} {v}" for k, v in rec.items() if k not in ("method", "seed")))
            # after every run: a study cut short by a time limit keeps what it measured
            md = write_results(args, name, label, model, data, test_path, seeds, methods, runs)
    harness.log(f"wrote {name}.json/.md/.png")
    print("\n".join(md))


def write_results(args: argparse.Namespace, name: str, label: str, model: str, data: dict[str, Any], test_path: str,
                  seeds: list[int], methods: list[str], runs: list[dict[str, Any]],
                  machine: dict[str, Any] | None = None, merged_from: list[str] | None = None) -> list[str]:
    """Summary (mean, std per method; best minus the others), JSON, Markdown and the plot."""
    summary = []
    for method in methods:
        ok = [r for r in runs if r["method"] == method and "error" not in r]
        m, s = _mean_std([r["test_accuracy"] for r in ok])
        f1 = [r["test_macro_f1"] for r in ok if r["test_macro_f1"] is not None]
        summary.append({"method": method, "trainable_params": ok[0]["trainable_params"] if ok else None,
                        "seeds": len(ok), "mean_accuracy": m, "std_accuracy": s,
                        "mean_macro_f1": _mean_std(f1)[0], "accuracies": [r["test_accuracy"] for r in ok],
                        "precision": ok[0]["precision"] if ok else None,
                        "mean_train_examples_per_s": _mean_std([r["train_examples_per_s"] for r in ok])[0]})
    by = {s["method"]: s for s in summary}
    comparisons = {}
    if by.get("best", {}).get("mean_accuracy") is not None:
        for other in ("seed", "full"):
            if by.get(other, {}).get("mean_accuracy") is not None:
                comparisons[f"best_minus_{other}_points"] = round(100 * (by["best"]["mean_accuracy"]
                                                                         - by[other]["mean_accuracy"]), 2)

    machine = machine or common.machine_info()
    out_dir = Path(args.out_dir) if args.out_dir else common.BENCH_DIR / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "model": label, "model_path": model, "train_rows": data["train_rows"],
              "val_rows": data["val_rows"], "test": test_path, "test_rows": args.test_rows, "epochs": args.epochs,
              "seeds": seeds, "budget": args.budget, "full_lr": args.full_lr, "full_precision": args.full_precision,
              "threads": args.threads, "summary": summary, "comparisons": comparisons, "runs": runs, "machine": machine,
              "loraclf_args": args.loraclf_args, "source": data.get("source"), "date": time.strftime("%Y-%m-%d"),
              **({"merged_from": merged_from} if merged_from else {})}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [{"method": s["method"], "trainable_params": s["trainable_params"], "seeds": s["seeds"],
             "test_accuracy_mean": s["mean_accuracy"], "test_accuracy_std": s["std_accuracy"],
             "test_macro_f1_mean": s["mean_macro_f1"], "precision": s["precision"],
             "train_examples_per_s": s["mean_train_examples_per_s"]} for s in summary]
    source = f" from {Path(data['source']).name}" if data.get("source") else ""
    md = [f"# Accuracy study: {label}", "",
          f"Machine: {machine['cpu_model']} ({machine.get('cpu_count')} CPUs, {args.threads or 'default'} torch threads per run), GPU: {machine.get('gpu_name') or 'none'}. "
          f"{data['train_rows']} training rows and {data['val_rows']} validation rows{source}, "
          f"test: {Path(test_path).name} ({'all rows' if args.test_rows < 0 else f'first {args.test_rows} rows'}), "
          f"{args.epochs} epochs, seeds {seeds}{f', loraclf runs with {args.loraclf_args}' if args.loraclf_args else ''}"
          f"{'' if len(runs) == len(seeds) * len(methods) else f' (partial: {len(runs)} of {len(seeds) * len(methods)} runs)'}.",
          "",
          common.markdown_table(rows), "",
          "Per run: " + "; ".join(f"{r['method']}/{r['seed']}: {r.get('test_accuracy', r.get('error'))}" for r in runs),
          "", "Comparisons (mean test accuracy, points): " + json.dumps(comparisons), ""]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    plot(summary, f"{label}: {data['train_rows']} rows, {args.epochs} epochs, {len(seeds)} seeds",
         out_dir / f"{name}.png")
    return md


if __name__ == "__main__":
    main()
