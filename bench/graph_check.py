"""Does ``train.cuda_graphs`` train the same adapter as the eager loop, on a real GPU?

Two short runs of the same recipe, same rows, same padding (multiples of 16), dropout off
unless ``--keep-dropout`` (then: are the masks drawn the same way?), fp32 by default: eager with fused
accumulation, then CUDA graphs. Reports the largest difference of per-step training losses
and of adapter tensors, validation accuracy of both, the graphs captured / replayed, the
training-loop seconds of each epoch, and — when capture fails — the error and the places that
synchronised with the host during the eager warm-up steps (``torch.cuda.set_sync_debug_mode``).

    python bench/graph_check.py --model roberta-arch --rows 640 --epochs 2 --out /tmp/graph_check.json

Writes JSON (``--out``) and a Markdown summary beside it. Needs CUDA; exits 0 either way so a
device script goes on to its next step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402


def _without_dropout(model: str, dest: Path) -> str:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model, dest)
    conf = json.loads((dest / "config.json").read_text())
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if key in conf:
            conf[key] = 0.0
    (dest / "config.json").write_text(json.dumps(conf))
    return str(dest)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="roberta-arch")
    p.add_argument("--train", default=None)
    p.add_argument("--rows", type=int, default=640)
    p.add_argument("--val-rows", type=int, default=200)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "graph_check.json"))
    p.add_argument("--keep-dropout", action="store_true",
                   help="leave dropout on: do graphed and eager runs draw the same dropout masks?")
    p.add_argument("--standin", action="store_true",
                   help="CPU smoke test of this script: 'capture' runs the step eagerly (no graph is made)")
    args = p.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    import loraclf.train as t
    from loraclf.config import load_config
    from loraclf.graphs import StepGraphs
    from safetensors.torch import load_file

    work = harness.cache_root() / "graph-check"
    model_path, model_label = harness.resolve_model(args.model, 0)
    if not args.keep_dropout:
        model_path = _without_dropout(model_path, work / "model-no-dropout")
    data = harness.prepare_data(work / "data", harness.default_source(args.train), args.rows, args.val_rows, 0)
    made: list[StepGraphs] = []

    class Rerun:  # --standin: "capture" records the step, "replay" runs it again eagerly
        def eager(self, fn):
            return fn()

        def capture(self, fn):
            out = fn()
            return (lambda: out.copy_(fn())), out

    class Recorded(StepGraphs):
        def __init__(self, *a, **k):
            if args.standin:
                k["backend"] = Rerun()
            super().__init__(*a, **k)
            made.append(self)

    t.StepGraphs = Recorded
    if args.standin:
        t._cuda_graphs_unsupported = lambda: None
    out: dict = {"machine": common.machine_info(), "model": model_label, "rows": data["train_rows"],
                 "dropout": args.keep_dropout,
                 "epochs": args.epochs, "precision": args.precision, "torch": torch.__version__,
                 "transformers": transformers.__version__}
    runs = {}
    for graphed in (False, True):
        name = "graphs" if graphed else "eager"
        run_dir = work / name
        cfg = load_config(harness.SEED_CONFIG, {
            "model.name_or_path": model_path, "data.train": data["train"], "data.validation": data["validation"],
            "data.format": "agnews", "data.test": None, "lora.layers": harness.seed_layers(model_path),
            **({} if args.keep_dropout else {"lora.dropout": 0.0}),
            "train.epochs": args.epochs, "train.output_dir": str(run_dir), "train.overwrite": True,
            "train.precision": args.precision, "train.fuse_accumulation": True, "data.pad_to_multiple_of": 16,
            "train.cuda_graphs": graphed, "train.log_every_steps": 1, "train.checkpoint_every_steps": None})
        rec: dict = {}
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if graphed and torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
            try:
                result = t.train(cfg)
                rec.update(ok=True, val_accuracy=result.validation["accuracy"])
            except Exception as e:  # noqa: BLE001 - report and go on
                rec.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
            finally:
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode(0)
        syncs: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                where = f"{Path(w.filename).name}:{w.lineno}"
                syncs[where] = syncs.get(where, 0) + 1
        rec["sync_warnings"] = syncs
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        rec["losses"] = [r["loss"] for r in records if r.get("event") == "train"]
        rec["epoch_seconds"] = [r.get("train_seconds") for r in records if r.get("split") == "validation"]
        if graphed and made:
            g = made[-1]
            rec.update(graphs=len(g.graphs), replays=g.replays, eager_steps=g.eager_steps)
        adapter = run_dir / "adapter" / "adapter_model.safetensors"
        rec["adapter"] = str(adapter) if adapter.exists() else None
        # the adapter is the best epoch's, often epoch 1 with random weights (the first of a tie):
        # the weights after the last step are the newest checkpoint's
        from loraclf import checkpoint

        last = checkpoint.latest(run_dir)
        rec["final_weights"] = str(last / "trainable.safetensors") if last is not None else None
        if (run_dir / "run.json").exists():
            rec["best_epoch"] = json.loads((run_dir / "run.json").read_text()).get("best_epoch")
        runs[name] = rec
        print(json.dumps({k: v for k, v in rec.items() if k not in ("losses", "traceback")}), flush=True)
        if rec.get("traceback"):
            print(rec["traceback"], flush=True)
    out["runs"] = {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in runs.items()}
    e, g = runs["eager"], runs["graphs"]
    if e.get("adapter") and g.get("adapter"):
        we, wg = load_file(e["adapter"]), load_file(g["adapter"])
        out["adapter_max_abs_diff"] = max(float((we[k].float() - wg[k].float()).abs().max()) for k in we)
        out["adapter_max_abs"] = max(float(we[k].float().abs().max()) for k in we)
    if e.get("final_weights") and g.get("final_weights"):
        we, wg = load_file(e["final_weights"]), load_file(g["final_weights"])
        out["final_weights_max_abs_diff"] = max(float((we[k].float() - wg[k].float()).abs().max()) for k in we)
    if e["losses"] and g["losses"]:
        n = min(len(e["losses"]), len(g["losses"]))
        out["steps_compared"] = n
        out["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(e["losses"][:n], g["losses"][:n]))
        out["loss_first_last"] = {"eager": [e["losses"][0], e["losses"][-1]], "graphs": [g["losses"][0], g["losses"][-1]]}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    lines = [f"# graph_check: {model_label}, {out['rows']} rows, {args.epochs} epochs, {args.precision}, "
             f"dropout {'on' if args.keep_dropout else 'off'}, pad 16; {out['machine'].get('gpu_name') or out['machine'].get('cpu_model')}", "",
             "| run | ok | val acc | epoch seconds | graphs / replays / eager steps | syncs seen |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['ok']} | {r.get('val_accuracy')} | {r['epoch_seconds']} | "
                     f"{r.get('graphs', '-')} / {r.get('replays', '-')} / {r.get('eager_steps', '-')} | "
                     f"{sum(r['sync_warnings'].values())} |")
    lines += ["", f"loss max |diff| over {out.get('steps_compared')} steps: {out.get('loss_max_abs_diff')}; "
              f"best-epoch adapter max |diff|: {out.get('adapter_max_abs_diff')} (max |w| {out.get('adapter_max_abs')}, "
              f"best epochs {[r.get('best_epoch') for r in runs.values()]}); weights after the last step max |diff|: "
              f"{out.get('final_weights_max_abs_diff')}"]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
