"""Host cost of a prediction: what ``Predictor.predict`` spends on the CPU per row besides the model.

On a GPU with inference graphs the model's forward is a graph replay, so the host's work per row
(tokenizing, padding batches, copying, building results) bounds the examples/s. This measures that
work on this machine with a model that costs next to nothing: a 1-layer, 32-wide random RoBERTa
with the real tokenizer (``--tokenizer``, roberta-base's from ../shared by default), in fp32 on
the CPU, on ``--rows`` AG News test texts. Phases (each timed on its own, medians of ``--repeats``):
- ``encode``: ``Predictor.encode`` (checks, strip, the tokenizer's batch call);
- ``collate``: padding every length-sorted batch (``PadCollator``), nothing else;
- ``logits``: ``logits_for`` on the encoded rows (collate + the tiny forward + gathering);
- ``predict``: the whole ``Predictor.predict`` (encode + logits + softmax + result dicts).
The ``predict`` column's examples/s is this machine's ceiling for the host side of predict at
that batch size. Run it under another tree's PYTHONPATH to compare code versions.

    .venv/bin/python bench/host_cost.py --name host_cost
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(common.SHARED_DIR / "models" / "roberta-base"))
    ap.add_argument("--test", default=None, help="AG News CSV (default: ../shared's test.csv.gz)")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--batch-sizes", default="32,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--name", default=None, help="write bench/results/<name>.{json,md}")
    ap.add_argument("--out", default=None, help="write this JSON path (and the .md beside it) instead")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    import loraclf
    from loraclf.data import PadCollator, sorted_batches
    from loraclf.predict import Predictor, logits_for

    if args.threads:
        torch.set_num_threads(args.threads)
    test = args.test or common.default_test_csv()
    if test is None:
        sys.exit("no AG News test file: pass --test")
    texts = [t for t, _ in common.read_ag_news_csv(test)][: args.rows]
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=514, num_labels=4)
    model = RobertaForSequenceClassification(cfg)
    records = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        pred = Predictor(model, tok, ["a", "b", "c", "d"], 512, batch_size=bs, device="cpu", precision="fp32")
        pred.predict(texts[:bs])  # first-call set-up out of the timings
        ids = pred.encode(texts)
        collate = PadCollator(tok.pad_token_id)
        batches = sorted_batches([len(x) for x in ids], bs)
        phases = {
            "encode": lambda: pred.encode(texts),
            "collate": lambda: [collate([(ids[i], -1) for i in b]) for b in batches],
            "logits": lambda: logits_for(pred.model, ids, tok.pad_token_id, bs, pred.device, pred.precision),
            "predict": lambda: pred.predict(texts),
        }
        times: dict[str, list[float]] = {k: [] for k in phases}
        for _ in range(args.repeats):
            for k, fn in phases.items():  # interleaved: a noisy moment hits every phase alike
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        rec = {"batch_size": bs, "rows": len(texts)}
        for k, ts in times.items():
            med = statistics.median(ts)
            rec[f"{k}_us_per_row"] = round(med / len(texts) * 1e6, 2)
        rec["predict_examples_per_s"] = round(len(texts) / statistics.median(times["predict"]), 1)
        records.append(rec)
        print(rec, flush=True)
    if args.name or args.out:
        machine = common.machine_info()
        notes = (f"loraclf from {Path(loraclf.__file__).parent}; {args.repeats} repeats, medians; a 1-layer 32-wide "
                 f"random RoBERTa (model cost ~0) with the tokenizer from {args.tokenizer}, fp32 on the CPU, "
                 f"{len(texts)} rows of {test}.\n")
        cols = ["batch_size", "rows", "encode_us_per_row", "collate_us_per_row", "logits_us_per_row",
                "predict_us_per_row", "predict_examples_per_s"]
        jp, mp = common.write_results(args.name or Path(args.out).stem, records, cols, title="Host cost of a prediction",
                                      notes=notes, machine=machine, json_path=args.out)
        print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
