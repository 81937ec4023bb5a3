"""Padding of loraclf's training batches on real AG News lengths: no model, no training.

What each way of cutting an epoch into batches costs in padded tokens (rows x the batch's longest
row, summed over ``--epochs`` epochs of LengthGroupedBatchSampler), for the seed recipe's
batch_size 16 x gradient_accumulation_steps 2:
- ``micro-alone``: each 16-row micro-batch length-grouped on its own (unfused accumulation
  before step groups; what a checkpoint written before them still resumes with);
- ``step-split``: 32-row step groups split into two 16-row micro-batches (unfused now);
- ``fused``: the 32-row step groups as one batch (fused accumulation, the GPU default).

Example:

    .venv/bin/python bench/sampler_padding.py --tokenizer ../shared/models/roberta-base
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(common.SHARED_DIR / "models" / "roberta-base"))
    ap.add_argument("--train", default=None, help="AG News CSV (default: train_partial.csv.gz)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from loraclf.data import LengthGroupedBatchSampler

    train = args.train or common.default_train_csv()
    if train is None:
        sys.exit("no AG News training file: pass --train")
    texts = [t for t, _ in common.read_ag_news_csv(train)]
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"]]
    real = args.epochs * sum(lengths)
    k = args.accumulation
    ways = {"micro-alone": {"accumulate": 1}, "step-split": {"accumulate": k, "split": True},
            "fused": {"accumulate": k, "split": False}}
    out = {"rows": len(lengths), "mean_tokens": sum(lengths) / len(lengths), "batch_size": args.batch_size,
           "accumulation": k, "epochs": args.epochs}
    for name, kw in ways.items():
        sampler = LengthGroupedBatchSampler(lengths, args.batch_size, args.seed, **kw)
        padded = batches = 0
        for epoch in range(1, args.epochs + 1):
            sampler.begin_epoch(epoch)
            for b in sampler:
                padded += len(b) * max(lengths[i] for i in b)
                batches += 1
        out[name] = {"batches": batches, "padded_tokens": padded, "pad_fraction": round(1 - real / padded, 4)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
