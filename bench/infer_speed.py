"""Inference speed: the ``loraclf predict`` path vs ``transformers.pipeline("text-classification")``
on the same trained adapter, at several batch sizes, in one invocation; plus bf16 vs fp32
prediction agreement.

Contenders (``--contenders``):
  * ``loraclf:fp32`` / ``loraclf:bf16`` / ``loraclf:auto`` - ``loraclf.predict.Predictor.from_run``
    (base loaded in fp32, LoRA merged into the weights, rows sorted by length, batches of
    ``batch_size``), timed on ``Predictor.predict(texts)``: tokenization, inference, softmax and
    the result dicts, with CUDA graphs off (``cuda_graphs=False``: the eager forward); ``:graphs``
    appended (GPU only): each batch shape's forward replayed from a CUDA graph
    (``Predictor(cuda_graphs=True)``, what ``loraclf predict`` does on a GPU by default since GPU
    check 4; pair with ``--warm-pass``);
  * ``pipeline`` - the same base + adapter loaded with transformers / PEFT directly
    (``PeftModel.from_pretrained(...).merge_and_unload()``: the pipeline gets the *merged* plain
    model, so both sides run the same weights and LoRA costs nothing on either), then
    ``pipeline("text-classification", model=merged, tokenizer=run's tokenizer)`` called on the
    texts in their given order with ``batch_size`` and ``truncation=True``; fp32.

Every (contender, batch size) run is its own process (peak RSS / CUDA memory per run); the
contenders alternate in a rotated order ``--repeats`` times. Speed is measured on ``--rows``
test rows (``--rows-bs1`` at batch size 1), after one warm-up batch. Agreement: loraclf bf16 vs
fp32 labels on ``--agreement-rows`` test rows (-1: the whole test file), and the pipeline's
labels vs loraclf fp32 on the speed rows.

The trained adapter: ``--run RUN_DIR`` (a loraclf run), else one is trained first with loraclf
(fp32, seed recipe, ``--train-rows`` rows, 1 epoch).

Examples:

    .venv/bin/python bench/infer_speed.py --model minilm --train-rows 1024 --rows 1024
    .venv/bin/python bench/infer_speed.py --model roberta-arch --train-rows 64 --rows 256 --agreement-rows 512
"""

from __future__ import annotations

import argparse
import json
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


# =========================================================================== workers
def _batch_sizes(spec):
    return spec.get("batch_sizes") or [spec["batch_size"]]


def _rows_for(spec, bs):
    return spec["rows_bs1"] if bs == 1 and spec.get("rows_bs1") else spec["rows"]


def loraclf_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from loraclf.predict import Predictor

    with common.Timer() as t_load:
        pred = Predictor.from_run(spec["run_dir"], batch_size=_batch_sizes(spec)[0], precision=spec["precision"],
                                  cuda_graphs=spec.get("cuda_graphs", False))
    names = pred.label_names
    out_recs = []
    for bs in _batch_sizes(spec):
        texts, labels = harness.read_texts_labels(spec["test"], _rows_for(spec, bs), spec["seed"])
        pred.batch_size = bs
        if spec.get("warmup", True):
            pred.predict(texts[: max(1, bs)][:64])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with common.Timer() as t:
            out = pred.predict(texts)
        preds = [names.index(o["label"]) for o in out]
        out_recs.append(_record(spec, bs, "loraclf", pred.precision, str(pred.device), t.seconds, t_load.seconds,
                                preds, labels, _warm_seconds(spec, lambda: pred.predict(texts))))
    return out_recs


def pipeline_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import yaml

    run = Path(spec["run_dir"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    names = json.loads((run / "labels.json").read_text())
    base = cfg["model"]["name_or_path"]
    max_length = int(cfg["data"]["max_length"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with common.Timer() as t_load:
        config = AutoConfig.from_pretrained(base, num_labels=len(names), id2label=dict(enumerate(names)),
                                            label2id={n: i for i, n in enumerate(names)})
        model = AutoModelForSequenceClassification.from_pretrained(base, config=config, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(run / "adapter")).merge_and_unload().eval()
        tok = AutoTokenizer.from_pretrained(run / "tokenizer")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        max_length = min(max_length, tok.model_max_length or max_length)
        pipe = pipeline("text-classification", model=model, tokenizer=tok, device=device)
    out_recs = []
    for bs in _batch_sizes(spec):
        texts, labels = harness.read_texts_labels(spec["test"], _rows_for(spec, bs), spec["seed"])
        kw = {"batch_size": bs, "truncation": True, "max_length": max_length}
        if spec.get("warmup", True):
            pipe(texts[: max(1, bs)][:64], **kw)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with common.Timer() as t:
            out = pipe(texts, **kw)
        preds = [names.index(o["label"]) for o in out]
        out_recs.append(_record(spec, bs, "pipeline", "fp32", str(device), t.seconds, t_load.seconds, preds, labels,
                                _warm_seconds(spec, lambda: pipe(texts, **kw))))
    return out_recs


def _warm_seconds(spec: dict[str, Any], again) -> float | None:
    """With --warm-pass: the same texts timed a second time in the same process, every batch
    shape seen before (a server's steady state; the first pass pays per-shape set-up)."""
    if not spec.get("warm_pass"):
        return None
    with common.Timer() as t:
        again()
    return t.seconds


def _record(spec, bs, stack, precision, device, seconds, load_s, preds, labels, warm_s=None) -> dict[str, Any]:
    import torch

    mem = common.peak_memory()
    n = len(preds)
    return {
        "warm_examples_per_s": round(n / warm_s, 2) if warm_s else None,
        "contender": spec["label"],
        "stack": stack,
        "precision": precision,
        "device": device,
        "batch_size": bs,
        "rows": n,
        "seconds": round(seconds, 3),
        "examples_per_s": round(n / seconds, 2) if seconds else None,
        "load_s": round(load_s, 2),
        "accuracy": round(sum(int(p == y) for p, y in zip(preds, labels)) / n, 4) if n else None,
        "peak_rss_mib": mem["peak_rss_mib"],
        "cuda_max_allocated_mib": mem.get("cuda_max_allocated_mib"),
        "torch_threads": torch.get_num_threads(),
        "preds": preds if spec.get("save_preds") and bs in spec.get("save_preds_bs", [32]) else None,
    }


# =========================================================================== orchestration
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="minilm", help="minilm | roberta-arch | folder (used only to train a run)")
    p.add_argument("--run", default=None, help="a finished loraclf run directory (default: train one)")
    p.add_argument("--train-rows", type=int, default=1024, help="rows of the run trained when --run is not given")
    p.add_argument("--test", default=None, help="canonical AG News CSV[.gz] to predict (default: shared test.csv.gz)")
    p.add_argument("--rows", type=int, default=1024, help="rows timed at batch sizes > 1")
    p.add_argument("--rows-bs1", type=int, default=128, help="rows timed at batch size 1")
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--contenders", default="loraclf:fp32,loraclf:bf16,pipeline")
    p.add_argument("--agreement-rows", type=int, default=-1, help="test rows for the bf16-vs-fp32 agreement (-1: all; 0: skip)")
    p.add_argument("--agreement-batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--process-per", choices=["batch", "contender"], default="batch",
                   help="batch: a process per (contender, batch size), peak RSS per batch size; contender: one process "
                        "runs every batch size (fewer model loads, e.g. on a GPU; CUDA peaks are still per batch size, "
                        "RSS peaks are cumulative)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warm-pass", action="store_true",
                   help="also time a second pass over the same texts in the same process (warm_examples_per_s)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--name", default=None, help="result name (default infer_speed_<model>)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json; .md beside it)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _contender(spec: str) -> dict[str, Any]:
    parts = spec.strip().split(":")
    if parts[0] == "pipeline":
        return {"label": "pipeline", "kind": "pipeline", "precision": "fp32"}
    graphs = parts[-1] == "graphs"
    if graphs:
        parts = parts[:-1]
    if parts[0] == "loraclf" and len(parts) <= 2:
        prec = parts[1] if len(parts) == 2 else "auto"
        if prec not in ("fp32", "bf16", "auto"):
            raise SystemExit(f"contender {spec!r}: precision fp32 | bf16 | auto")
        return {"label": f"loraclf:{prec}" + (":graphs" if graphs else ""), "kind": "loraclf", "precision": prec,
                "cuda_graphs": graphs}
    raise SystemExit(f"unknown contender {spec!r} (loraclf[:fp32|bf16|auto][:graphs] | pipeline)")


def _run(kind: str, spec: dict[str, Any], work: Path, tag: str, args) -> list[dict[str, Any]]:
    sp, out = work / f"{tag}.spec.json", work / f"{tag}.json"
    sp.write_text(json.dumps({**spec, "kind": kind}))
    if out.exists():
        out.unlink()
    cmd = [sys.executable, str(HERE), "--worker", str(sp), "--worker-out", str(out)]
    return harness.run_worker_all(cmd, out, args.timeout, args.threads, label=tag)


def train_run(args, work: Path) -> Path:
    """A loraclf run to predict with: fp32, seed recipe, 1 epoch on --train-rows rows."""
    import train_speed

    model_path, label = harness.resolve_model(args.model, args.seed)
    data = harness.prepare_data(work / "data", harness.default_source(None), args.train_rows, 200, args.seed)
    run_dir = work / "run"
    spec = {"label": "loraclf:fp32", "model_path": model_path, "train": data["train"], "validation": data["validation"],
            "test": None, "layers": harness.seed_layers(model_path), "epochs": 1, "precision": "fp32",
            "pad_multiple": None, "seed": args.seed, "threads": args.threads, "run_dir": str(run_dir), "keep_run": True}
    sp = work / "train.spec.json"
    sp.write_text(json.dumps(spec))
    log(f"training a run to predict with: {label}, {data['train_rows']} rows, 1 epoch, fp32 ...")
    rec = harness.run_worker([sys.executable, str(Path(train_speed.__file__)), "--worker", str(sp), "--worker-out",
                              str(work / "train.json")], work / "train.json", args.timeout, args.threads, label="train")
    if "error" in rec:
        raise SystemExit(f"could not train a run: {rec['error']}")
    log(f"  trained: val acc {rec.get('val_accuracy')}, {rec.get('train_examples_per_s')} ex/s")
    return run_dir


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        recs = loraclf_worker(spec) if spec["kind"] == "loraclf" else pipeline_worker(spec)
        Path(args.worker_out).write_text(json.dumps({"results": recs}, default=str))
        return {"results": recs}

    work = Path(tempfile.mkdtemp(prefix="infer_speed_", dir=harness.cache_root()))
    test = args.test or common.default_test_csv()
    if test is None:
        raise SystemExit("no test CSV found: pass --test")
    run_dir = Path(args.run) if args.run else train_run(args, work)
    run_info = json.loads((run_dir / "run.json").read_text())
    base = run_info.get("base_model")
    contenders = [_contender(s) for s in args.contenders.split(",") if s.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    log(f"infer_speed: run {run_dir} (base {base}), contenders {[c['label'] for c in contenders]}, batch sizes "
        f"{batch_sizes}, {args.rows} rows ({args.rows_bs1} at batch 1), {args.repeats} repeat(s)")

    # ------------------------------------------------------------------ summary
    def write(runs: list[dict[str, Any]], agreement: dict[str, Any], partial: bool = False) -> tuple[Path, Path, list]:
        """The JSON and Markdown results of the runs so far: written after every contender too,
        so that a step cut short by its time limit still returns what it measured."""
        runs = [{k: v for k, v in r.items() if k != "preds"} for r in runs]
        table = []
        for bs in batch_sizes:
            ref = harness.median([r["examples_per_s"] for r in runs if r.get("batch_size") == bs
                                  and r["contender"] == "pipeline" and "error" not in r])
            for c in contenders:
                mine = [r for r in runs if r["contender"] == c["label"] and r.get("batch_size") == bs]
                s = harness.summarize(mine, ["examples_per_s", "warm_examples_per_s", "rows", "accuracy", "peak_rss_mib",
                                             "cuda_max_allocated_mib", "load_s"])
                row = {"contender": c["label"], "batch_size": bs, "runs": s.pop("n"), **s}
                row.pop("failed", None)
                row["rows"] = int(row["rows"]) if row.get("rows") is not None else None
                row["vs_pipeline"] = round(row["examples_per_s"] / ref, 2) if ref and row.get("examples_per_s") else None
                table.append(row)
        machine = common.machine_info()
        if args.threads:
            machine["torch_threads"] = args.threads
        name = args.name or f"infer_speed_{args.model if args.model in ('minilm', 'roberta-arch') else 'run'}"
        agree_txt = ", ".join(f"{k} {v}" for k, v in agreement.items() if not isinstance(v, dict))
        acc_txt = "; ".join(f"{k}: accuracy {v.get('accuracy')} on {v.get('rows')} rows ({v.get('examples_per_s')} ex/s at "
                            f"batch {args.agreement_batch_size})" for k, v in agreement.items() if isinstance(v, dict) and "accuracy" in v)
        per = ("each (contender, batch size) in its own process" if args.process_per == "batch" else
               "each contender in its own process running every batch size (RSS peaks cumulative)")
        notes = (f"Run {run_dir.name} (base {base}). Medians of {args.repeats} alternating repeat(s), {per}, "
                 f"after one warm-up batch. examples/s include tokenization. `vs_pipeline` = examples/s over the "
                 f"pipeline's at the same batch size. The pipeline gets the merged (plain) model. Agreement: {agree_txt}. "
                 f"{acc_txt}.\n")
        if partial:
            notes = f"PARTIAL: the {len(runs)} measurement(s) done so far; the script had not finished. " + notes
        columns = ["contender", "batch_size", "runs", "rows", "examples_per_s", "vs_pipeline", "accuracy", "peak_rss_mib",
                   "cuda_max_allocated_mib", "load_s"] + (["warm_examples_per_s"] if args.warm_pass else [])
        settings = {"run_dir": str(run_dir), "base_model": base, "test": str(test), "rows": args.rows, "rows_bs1": args.rows_bs1,
                    "repeats": args.repeats, "seed": args.seed, "run_validation_accuracy":
                    (run_info.get("metrics") or {}).get("validation", {}).get("accuracy")}
        jp, mp = common.write_results(name, [{**t, "settings": settings} for t in table], columns,
                                      title=f"Inference speed: loraclf predict vs pipeline", notes=notes, machine=machine,
                                      json_path=args.out)
        raw = json.loads(jp.read_text())
        raw["agreement"] = agreement
        raw["runs"] = runs
        jp.write_text(json.dumps(raw, indent=2, default=str) + "\n")
        return jp, mp, table

    runs: list[dict[str, Any]] = []
    groups = [[bs] for bs in batch_sizes] if args.process_per == "batch" else [batch_sizes]
    for rep in range(args.repeats):
        for gi, group in enumerate(groups):
            for c in harness.rotate(contenders, rep + gi):
                spec = {"label": c["label"], "run_dir": str(run_dir), "precision": c["precision"], "batch_sizes": group,
                        "cuda_graphs": c.get("cuda_graphs", False),
                        "test": str(test), "rows": args.rows, "rows_bs1": args.rows_bs1, "seed": args.seed,
                        "threads": args.threads, "save_preds": rep == 0, "save_preds_bs": [32],
                        "warm_pass": args.warm_pass}
                tag = f"{c['label'].replace(':', '-')}-bs{'_'.join(map(str, group))}-r{rep}"
                recs = _run(c["kind"], spec, work, tag, args)
                if len(recs) == 1 and "error" in recs[0]:
                    recs = [{**recs[0], "batch_size": bs} for bs in group]
                for rec in recs:
                    rec.update(contender=c["label"], repeat=rep)
                    runs.append(rec)
                    if "error" not in rec:
                        log(f"repeat {rep + 1} bs {rec['batch_size']} {c['label']}: {rec['examples_per_s']} ex/s over "
                            f"{rec['rows']} rows, peak RSS {rec['peak_rss_mib']} MiB" +
                            (f", CUDA {rec['cuda_max_allocated_mib']} MiB" if rec.get("cuda_max_allocated_mib") else ""))
                write(runs, {}, partial=True)

    # ------------------------------------------------------------------ agreement (bf16 vs fp32)
    agreement: dict[str, Any] = {}
    if args.agreement_rows != 0:
        preds = {}
        for prec in ("fp32", "bf16"):
            spec = {"label": f"loraclf:{prec}", "run_dir": str(run_dir), "precision": prec,
                    "batch_sizes": [args.agreement_batch_size], "test": str(test), "rows": args.agreement_rows,
                    "seed": args.seed, "threads": args.threads, "save_preds": True,
                    "save_preds_bs": [args.agreement_batch_size], "warmup": False}
            log(f"agreement: loraclf {prec} on {'all' if args.agreement_rows < 0 else args.agreement_rows} test rows ...")
            rec = _run("loraclf", spec, work, f"agree-{prec}", args)[0]
            if "error" in rec:
                agreement[prec] = {"error": rec["error"]}
                continue
            preds[prec] = rec.pop("preds")
            agreement[prec] = {k: rec[k] for k in ("rows", "accuracy", "examples_per_s", "seconds", "peak_rss_mib",
                                                   "cuda_max_allocated_mib", "device", "precision")}
            log(f"  {prec}: accuracy {rec['accuracy']}, {rec['examples_per_s']} ex/s")
        if len(preds) == 2:
            a, b = preds["fp32"], preds["bf16"]
            agreement["bf16_vs_fp32_agreement"] = round(sum(int(x == y) for x, y in zip(a, b)) / len(a), 5)
            agreement["rows"] = len(a)
    # the pipeline vs loraclf fp32 on the same speed rows (batch 32, first repeat): a sanity check
    p32 = {r["contender"]: r.get("preds") for r in runs if r.get("batch_size") == 32 and r.get("preds")}
    if "bf16_vs_fp32_agreement" not in agreement and "loraclf:bf16" in p32 and "loraclf:fp32" in p32:
        a, b = p32["loraclf:fp32"], p32["loraclf:bf16"]  # the speed rows at batch 32
        agreement["bf16_vs_fp32_agreement"] = round(sum(int(x == y) for x, y in zip(a, b)) / len(a), 5)
        agreement["rows"] = len(a)
        agreement["from"] = "the batch-32 speed runs"
    if "pipeline" in p32 and "loraclf:fp32" in p32:
        a, b = p32["pipeline"], p32["loraclf:fp32"]
        agreement["pipeline_vs_loraclf_fp32_agreement"] = round(sum(int(x == y) for x, y in zip(a, b)) / len(a), 5)
        agreement["pipeline_vs_loraclf_rows"] = len(a)
    jp, mp, table = write(runs, agreement)
    for r in runs:
        r.pop("preds", None)

    shutil.rmtree(work, ignore_errors=True)
    print(mp.read_text())
    log(f"wrote {jp} and {mp}")
    return {"table": table, "agreement": agreement}


if __name__ == "__main__":
    main()
