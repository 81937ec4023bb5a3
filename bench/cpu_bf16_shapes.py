"""Why bf16 autocast can be slow on CPUs without AMX: a cost per *new* batch shape.

Probe for loraclf's CPU precision choice (``loraclf.precision.choose_precision``). oneDNN builds
(JIT-compiles) a kernel for each new matrix shape and keeps it in a primitive cache (default
1,024 entries, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). Length-grouped batches of AG News give a
new padded length, hence new shapes, at almost every step.

Each mode runs in its own process: the loraclf model (seed recipe: LoRA r=12 on query,value of
the seed layers, AdamW on the trainable parameters) trains on the first ``--steps`` batches of
loraclf's own LengthGroupedBatchSampler over ``--rows`` real AG News rows (batch 16), twice:
pass 1 meets every shape for the first time, pass 2 repeats exactly the same batches. The
per-step medians of the two passes separate the per-shape cost from the steady-state speed.

Modes (``--modes``): ``fp32``, ``bf16``, and either with ``:padN`` (padded length rounded up
to a multiple of N) or ``:cacheN`` (ONEDNN_PRIMITIVE_CACHE_CAPACITY=N for that process).

Example:

    .venv/bin/python bench/cpu_bf16_shapes.py --model minilm --rows 1024 --steps 48 \\
        --modes fp32,bf16,bf16:pad8,bf16:pad16,fp32:pad16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402
from harness import log  # noqa: E402

HERE = Path(__file__).resolve()


def worker(spec: dict) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from loraclf.config import load_config
    from loraclf.data import LengthGroupedBatchSampler, PadCollator, tokenize
    from loraclf.model import build_model, load_model_config, load_tokenizer
    from loraclf.precision import autocast
    from loraclf.train import training_loss

    cfg = load_config(harness.SEED_CONFIG, {"model.name_or_path": spec["model_path"], "lora.layers": spec["layers"]})
    texts, labels = harness.read_texts_labels(spec["train"], spec["rows"], spec["seed"])
    tok = load_tokenizer(cfg.model)
    ids = tokenize(texts, tok, cfg.data.max_length)
    names = ["World", "Sports", "Business", "Sci/Tech"]
    torch.manual_seed(spec["seed"])
    model = build_model(cfg.model, cfg.lora, load_model_config(cfg.model, names))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    sampler = LengthGroupedBatchSampler([len(x) for x in ids], cfg.train.batch_size, spec["seed"])
    (getattr(sampler, "begin_epoch", None) or sampler.set_epoch)(1)  # renamed in loraclf
    batches = list(sampler)[: spec["steps"]]
    collate = PadCollator(tok.pad_token_id)
    pad = spec.get("pad_multiple") or 1
    device = torch.device("cpu")

    def make(b):
        out = collate([(ids[i], labels[i]) for i in b])
        t = out["input_ids"].shape[1]
        w = math.ceil(t / pad) * pad
        if w != t:
            x = torch.full((len(b), w), tok.pad_token_id, dtype=torch.long)
            m = torch.zeros((len(b), w), dtype=torch.long)
            x[:, :t], m[:, :t] = out["input_ids"], out["attention_mask"]
            out["input_ids"], out["attention_mask"] = x, m
        return out

    data = [make(b) for b in batches]
    shapes = sorted({tuple(d["input_ids"].shape) for d in data})
    passes = []
    for p in (1, 2):
        times = []
        rss0 = harness.rss_now_mib()
        for d in data:
            t0 = time.perf_counter()
            with autocast(device, spec["precision"]):
                out = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"])
                loss = training_loss(out.logits, d["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        rows = sum(int(d["input_ids"].shape[0]) for d in data)
        passes.append({"pass": p, "median_s_per_step": round(statistics.median(times), 4),
                       "total_s": round(sum(times), 2), "examples_per_s": round(rows / sum(times), 2),
                       "rss_start_mib": round(rss0, 1), "rss_end_mib": round(harness.rss_now_mib(), 1)})
    real = sum(int(d["attention_mask"].sum()) for d in data)
    total = sum(int(d["input_ids"].numel()) for d in data)
    return {"mode": spec["label"], "precision": spec["precision"], "pad_multiple": spec.get("pad_multiple"),
            "onednn_cache": spec.get("cache"), "steps": len(data), "distinct_shapes": len(shapes),
            "pad_fraction": round(1 - real / total, 4),
            "pass1_s_per_step": passes[0]["median_s_per_step"], "pass2_s_per_step": passes[1]["median_s_per_step"],
            "pass1_examples_per_s": passes[0]["examples_per_s"], "pass2_examples_per_s": passes[1]["examples_per_s"],
            "pass1_total_s": passes[0]["total_s"], "pass2_total_s": passes[1]["total_s"],
            "rss_after_pass1_mib": passes[0]["rss_end_mib"], "rss_after_pass2_mib": passes[1]["rss_end_mib"],
            "peak_rss_mib": common.peak_memory()["peak_rss_mib"], "torch_threads": torch.get_num_threads()}


def parse_mode(s: str) -> dict:
    parts = s.split(":")
    if parts[0] not in ("fp32", "bf16"):
        raise SystemExit(f"mode {s!r}: fp32 | bf16 [:padN] [:cacheN]")
    m = {"label": s, "precision": parts[0], "pad_multiple": None, "cache": None}
    for p in parts[1:]:
        if p.startswith("pad"):
            m["pad_multiple"] = int(p[3:])
        elif p.startswith("cache"):
            m["cache"] = int(p[5:])
        else:
            raise SystemExit(f"mode {s!r}: cannot parse {p!r}")
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="minilm")
    p.add_argument("--rows", type=int, default=1024, help="rows the length-grouped batches are drawn from")
    p.add_argument("--steps", type=int, default=48, help="micro-batches per pass")
    p.add_argument("--modes", default="fp32,bf16,bf16:pad8,bf16:pad16")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--hog", type=int, default=0,
                   help="run this many busy-looping processes beside each measured run (a shared, loaded machine)")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rec = worker(json.loads(Path(args.worker).read_text()))
        Path(args.worker_out).write_text(json.dumps({"results": [rec]}))
        return rec

    model_path, label = harness.resolve_model(args.model, args.seed)
    layers = harness.seed_layers(model_path)
    modes = [parse_mode(s) for s in args.modes.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="bf16_shapes_", dir=harness.cache_root()))
    log(f"cpu_bf16_shapes: {label}, layers {layers}, first {args.steps} length-grouped batches of {args.rows} rows, "
        f"modes {[m['label'] for m in modes]}, {args.repeats} repeat(s)")
    runs = []
    for rep in range(args.repeats):
        for m in harness.rotate(modes, rep):
            spec = {**m, "model_path": model_path, "layers": layers, "train": harness.default_source(None),
                    "rows": args.rows, "steps": args.steps, "seed": args.seed, "threads": args.threads}
            tag = m["label"].replace(":", "-") + f"-r{rep}"
            sp, out = work / f"{tag}.spec.json", work / f"{tag}.json"
            sp.write_text(json.dumps(spec))
            old = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
            if m["cache"]:
                os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(m["cache"])
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hog)]
            try:
                rec = harness.run_worker([sys.executable, str(HERE), "--worker", str(sp), "--worker-out", str(out)],
                                         out, args.timeout, args.threads, label=tag)
            finally:
                for h in hogs:
                    h.terminate()
                    h.wait()
                if old is None:
                    os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
                else:
                    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = old
            rec.update(mode=m["label"], repeat=rep)
            runs.append(rec)
            if "error" not in rec:
                log(f"  {m['label']}: pass 1 {rec['pass1_s_per_step']} s/step ({rec['pass1_examples_per_s']} ex/s), "
                    f"pass 2 {rec['pass2_s_per_step']} s/step ({rec['pass2_examples_per_s']} ex/s), "
                    f"{rec['distinct_shapes']} shapes, RSS {rec['rss_after_pass1_mib']} -> {rec['rss_after_pass2_mib']} MiB")
    keys = ["steps", "distinct_shapes", "pad_fraction", "pass1_s_per_step", "pass2_s_per_step", "pass1_examples_per_s",
            "pass2_examples_per_s", "rss_after_pass1_mib", "rss_after_pass2_mib", "peak_rss_mib"]
    table = []
    for m in modes:
        s = harness.summarize([r for r in runs if r["mode"] == m["label"]], keys)
        table.append({"mode": m["label"], "runs": s.pop("n"), **{k: v for k, v in s.items() if k != "failed"}})
    ref = next((t for t in table if t["mode"] == "fp32"), None)
    for t in table:
        for ps in ("pass1", "pass2"):
            a, b = t.get(f"{ps}_examples_per_s"), ref and ref.get(f"{ps}_examples_per_s")
            t[f"{ps}_vs_fp32"] = round(a / b, 2) if a and b else None
    machine = common.machine_info()
    if args.threads:
        machine["torch_threads"] = args.threads
    flags = "AMX" if machine.get("cpu_amx") else ("AVX512-BF16, no AMX" if harness_bf16() else "no native bf16")
    hog = f" {args.hog} busy-looping process(es) ran beside every measured run." if args.hog else ""
    notes = (f"{label}, LoRA layers {layers}, batch 16, first {args.steps} batches of loraclf's length-grouped sampler "
             f"over {args.rows} AG News rows; pass 2 repeats pass 1's batches. CPU: {flags}. Medians of "
             f"{args.repeats} repeat(s), each mode its own process.{hog} `*_vs_fp32` = examples/s over plain fp32's.\n")
    columns = ["mode", "runs", "steps", "distinct_shapes", "pad_fraction", "pass1_s_per_step", "pass2_s_per_step",
               "pass1_examples_per_s", "pass2_examples_per_s", "pass1_vs_fp32", "pass2_vs_fp32",
               "rss_after_pass1_mib", "rss_after_pass2_mib"]
    name = args.name or f"cpu_bf16_shapes_{args.model}"
    jp, mp = common.write_results(name, table, columns, title=f"bf16 autocast vs fp32 on CPU, per-shape cost: {label}",
                                  notes=notes, machine=machine, json_path=args.out)
    raw = json.loads(jp.read_text())
    raw["runs"] = runs
    jp.write_text(json.dumps(raw, indent=2) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(mp.read_text())
    log(f"wrote {jp} and {mp}")


def harness_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


if __name__ == "__main__":
    main()
