"""Scaling: loraclf training time for 1x, 2x and 4x the data, in one invocation.

The sizes are nested (the 2x rows contain the 1x rows, from one seeded shuffle of the same
file), so their length distributions match; same model, recipe (configs/agnews-seed.yaml),
seed and validation rows. Each run is its own process; sizes alternate in a rotated order
``--repeats`` times. Time = loraclf's training loop (run.json throughput.train_seconds); the
target is linear growth: 4x the data within 4.4x the time.

Example:

    .venv/bin/python bench/scaling.py --model minilm --rows 512 --factors 1,2,4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402
from harness import log  # noqa: E402

import train_speed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="minilm", help="minilm | roberta-arch | a model folder")
    p.add_argument("--train", default=None, help="canonical AG News CSV[.gz] (default: shared train_partial)")
    p.add_argument("--rows", type=int, default=512, help="rows at 1x")
    p.add_argument("--factors", default="1,2,4")
    p.add_argument("--val-rows", type=int, default=64, help="validation rows (evaluation is not timed)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--name", default=None, help="result name (default scaling_<model>)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    factors = [int(f) for f in args.factors.split(",")]
    model_path, label = harness.resolve_model(args.model, args.seed)
    layers = harness.seed_layers(model_path)
    work = Path(tempfile.mkdtemp(prefix="scaling_", dir=harness.cache_root()))
    sizes = [args.rows * f for f in factors]
    data = harness.prepare_data(work / "data", harness.default_source(args.train), max(sizes), args.val_rows, args.seed,
                                nested=sizes)
    log(f"scaling: {label}, layers {layers}, sizes {sizes}, {args.epochs} epoch(s), precision {args.precision}, "
        f"{args.repeats} repeat(s)")
    runs = []
    for rep in range(args.repeats):
        for f, n in harness.rotate(list(zip(factors, sizes)), rep):
            tag = f"x{f}-r{rep}"
            spec = {"label": f"loraclf:{args.precision}", "model_path": model_path, "train": data[f"train_{n}"],
                    "validation": data["validation"], "test": None, "layers": layers, "epochs": args.epochs,
                    "precision": args.precision, "pad_multiple": None, "seed": args.seed, "threads": args.threads,
                    "run_dir": str(work / f"run-{tag}"), "keep_run": False}
            sp, out = work / f"{tag}.spec.json", work / f"{tag}.json"
            sp.write_text(json.dumps(spec))
            log(f"repeat {rep + 1}/{args.repeats}: {n} rows ({f}x) ...")
            rec = harness.run_worker([sys.executable, train_speed.__file__, "--worker", str(sp), "--worker-out", str(out)],
                                     out, args.timeout, args.threads, label=tag)
            rec.update(factor=f, rows=n, repeat=rep)
            runs.append(rec)
            shutil.rmtree(work / f"run-{tag}", ignore_errors=True)
            if "error" not in rec:
                log(f"  {n} rows: {rec['train_s']} s, {rec['train_examples_per_s']} ex/s, {rec['optimizer_steps']} steps")

    keys = ["train_s", "train_examples_per_s", "real_tokens_per_s", "optimizer_steps", "peak_rss_mib", "val_accuracy"]
    table = []
    for f, n in zip(factors, sizes):
        s = harness.summarize([r for r in runs if r["factor"] == f], keys)
        table.append({"factor": f, "rows": n, "runs": s.pop("n"), **{k: v for k, v in s.items() if k != "failed"}})
    base = table[0].get("train_s")
    for t in table:
        t["time_ratio"] = round(t["train_s"] / base, 3) if base and t.get("train_s") else None
        t["ideal_ratio"] = t["factor"] / factors[0]
    # paired ratios: each repeat's time at f over the same repeat's time at factors[0]
    paired = {}
    for f in factors[1:]:
        rs = []
        for rep in range(args.repeats):
            a = next((r for r in runs if r["factor"] == factors[0] and r["repeat"] == rep and "error" not in r), None)
            b = next((r for r in runs if r["factor"] == f and r["repeat"] == rep and "error" not in r), None)
            if a and b:
                rs.append(b["train_s"] / a["train_s"])
        paired[f] = [round(x, 3) for x in rs]
    last = table[-1]
    verdict = None
    if last.get("time_ratio") is not None:
        limit = 1.1 * last["ideal_ratio"]
        verdict = f"{last['factor']}x data took {last['time_ratio']}x the time (target <= {limit:.1f}x): " + (
            "PASS" if last["time_ratio"] <= limit else "FAIL")
    machine = common.machine_info()
    if args.threads:
        machine["torch_threads"] = args.threads
    notes = (f"{label}, LoRA layers {layers}, seed recipe, {args.epochs} epoch(s), precision {args.precision}; medians of "
             f"{args.repeats} alternating repeat(s), each run its own process. Paired per-repeat time ratios: "
             + "; ".join(f"{f}x: {v}" for f, v in paired.items()) + f". {verdict or ''}\n")
    columns = ["factor", "rows", "runs", "train_s", "time_ratio", "ideal_ratio", "train_examples_per_s",
               "real_tokens_per_s", "optimizer_steps", "peak_rss_mib"]
    name = args.name or f"scaling_{args.model if args.model in ('minilm', 'roberta-arch') else 'model'}"
    jp, mp = common.write_results(name, table, columns, title=f"Scaling with data: {label}", notes=notes,
                                  machine=machine, json_path=args.out)
    raw = json.loads(jp.read_text())
    raw.update(runs=runs, paired_ratios=paired, verdict=verdict)
    jp.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(mp.read_text())
    log(f"wrote {jp} and {mp}")
    return {"table": table, "verdict": verdict}


if __name__ == "__main__":
    main()
