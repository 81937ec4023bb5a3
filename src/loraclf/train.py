"""The training loop (accelerate): everything validated first, then weights loaded, then
AdamW on the trainable parameters only, per-epoch validation, the best epoch's adapter kept.

Order matters for the user: config, data rows and the parameter budget are all checked
before any weight is loaded or any file is written, so a mistake costs seconds and leaves
nothing behind that looks like a run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from . import budget, plots, runs
from .config import Config, TrainConfig, save_config
from .data import LengthGroupedBatchSampler, PadCollator, Splits, TokenizedDataset, load_splits, tokenize
from .errors import TrainingError
from .evaluate import classification_metrics
from .model import build_model, load_model_config, load_tokenizer, resolve_name, trainable_state_dict
from .precision import autocast, choose_precision
from .predict import logits_for


class Callback(Protocol):
    """How the loop reports progress; the CLI draws a progress bar, tests record events."""

    def on_start(self, total_steps: int, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, record: dict[str, Any]) -> None: ...
    def on_eval(self, record: dict[str, Any]) -> None: ...


class _Silent:
    def on_start(self, total_steps: int, info: dict[str, Any]) -> None:
        pass

    def on_step(self, step: int, record: dict[str, Any]) -> None:
        pass

    def on_eval(self, record: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    validation: dict[str, Any]
    test: dict[str, Any] | None
    trainable_params: int
    records: list[dict[str, Any]] = field(default_factory=list)


class _Metrics:
    """metrics.jsonl: appended and flushed per record, so a crash keeps what was measured."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _evaluate(model, ids, labels, names, cfg: Config, accelerator: Accelerator, precision: str) -> dict[str, Any]:
    model = accelerator.unwrap_model(model)
    logits = logits_for(model, ids, cfg_pad_id(model), cfg.train.eval_batch_size, accelerator.device, precision)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    out = classification_metrics(labels, logits.argmax(-1), names)
    out["loss"] = loss
    return out


def training_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in float32 (autocast may hand bf16 logits), with optional label smoothing."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters. With ``loraplus_lr_ratio``, PEFT's LoRA+ optimizer:
    LoRA B matrices at learning_rate x ratio, A matrices and head weights at learning_rate; note
    that PEFT also puts every 1-D trainable tensor (head biases, DoRA magnitudes) in the B group."""
    if tc.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        # PEFT sets each group's weight decay from loraplus_weight_decay, not weight_decay.
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=tc.learning_rate,
                                         loraplus_lr_ratio=tc.loraplus_lr_ratio,
                                         loraplus_weight_decay=tc.weight_decay, fused=fused or None)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=fused or None)


def cfg_pad_id(model: torch.nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def prepare(cfg: Config) -> tuple[Splits, Any, Any, budget.Breakdown]:
    """All checks that need no weights: data rows, tokenizer, architecture, budget."""
    splits = load_splits(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model_config = load_model_config(cfg.model, splits.label_names)
    if model_config.pad_token_id is None:
        model_config.pad_token_id = tokenizer.pad_token_id
    counts = budget.breakdown(build_model(cfg.model, cfg.lora, model_config, meta=True))
    budget.check(counts, cfg.train.max_trainable_params)
    return splits, tokenizer, model_config, counts


def train(cfg: Config, callback: Callback | None = None) -> TrainResult:
    cb = callback or _Silent()
    t_start = time.perf_counter()
    tc = cfg.train
    splits, tokenizer, model_config, counts = prepare(cfg)

    run_dir = Path(tc.output_dir)
    runs.prepare_dir(run_dir, tc.overwrite)
    # Record the base as an absolute path when local, so the run works from any directory.
    resolved = cfg.model_copy(deep=True)
    resolved.model.name_or_path = resolve_name(cfg.model.name_or_path)
    save_config(resolved, run_dir / runs.CONFIG_FILE)
    runs.write_json(run_dir / runs.LABELS_FILE, splits.label_names)
    info: dict[str, Any] = {
        "status": "running",
        "base_model": resolved.model.name_or_path,
        "label_names": splits.label_names,
        "seed": tc.seed,
        "data": splits.fingerprints,
        "rows": {"train": len(splits.train), "validation": len(splits.validation),
                 "test": len(splits.test) if splits.test is not None else 0},
        "params": counts.to_dict(),
        "versions": runs.environment(),
    }
    runs.write_json(run_dir / runs.RUN_FILE, info)
    tokenizer.save_pretrained(run_dir / runs.TOKENIZER_DIR)

    try:
        accelerator = Accelerator(gradient_accumulation_steps=tc.gradient_accumulation_steps)
        precision = choose_precision(tc.precision, accelerator.device)
        set_seed(tc.seed)  # before the model: the head and LoRA A matrices are initialised randomly
        model = build_model(resolved.model, cfg.lora, model_config)

        train_ids = tokenize(splits.train.texts, tokenizer, cfg.data.max_length)
        val_ids = tokenize(splits.validation.texts, tokenizer, cfg.data.max_length)
        sampler = LengthGroupedBatchSampler([len(x) for x in train_ids], tc.batch_size, tc.seed, tc.group_by_length)
        loader = torch.utils.data.DataLoader(TokenizedDataset(train_ids, splits.train.labels), batch_sampler=sampler,
                                             collate_fn=PadCollator(tokenizer.pad_token_id))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, cfg.train, fused=accelerator.device.type == "cuda")
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

        steps_per_epoch = math.ceil(len(loader) / tc.gradient_accumulation_steps)
        total_steps = steps_per_epoch * tc.epochs
        scheduler = get_scheduler("constant_with_warmup" if tc.scheduler == "constant" else tc.scheduler, optimizer,
                                  num_warmup_steps=math.ceil(tc.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        metrics = _Metrics(run_dir / runs.METRICS_FILE)
        cb.on_start(total_steps, {"device": str(accelerator.device), "precision": precision,
                                  "trainable": counts.trainable, "train_rows": len(splits.train)})

        step, best_acc, best_epoch, best_state, best_val = 0, -1.0, 0, None, {}
        stopped_early = None
        train_time, examples_seen, tokens_seen = 0.0, 0, 0
        for epoch in range(1, tc.epochs + 1):
            model.train()
            sampler.set_epoch(epoch)
            window_loss, window_n, t0 = 0.0, 0, time.perf_counter()
            for batch in loader:
                with accelerator.accumulate(model), autocast(accelerator.device, precision):
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    loss = training_loss(out.logits, batch["labels"], tc.label_smoothing)
                    if not torch.isfinite(loss.detach()):
                        raise TrainingError(f"loss became {loss.item()} at step {step + 1} (epoch {epoch})",
                                            where=str(run_dir), fix="lower --train.learning_rate or use fp32 precision")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                window_loss += loss.item()
                window_n += 1
                examples_seen += batch["input_ids"].shape[0]
                tokens_seen += int(batch["attention_mask"].sum())
                if accelerator.sync_gradients:
                    scheduler.step()
                    step += 1
                    if step % tc.log_every_steps == 0 or step == total_steps:
                        elapsed = train_time + time.perf_counter() - t0
                        record = {"event": "train", "split": "train", "epoch": epoch, "step": step,
                                  "loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                                  "examples_per_s": examples_seen / elapsed}
                        metrics.add(record)
                        window_loss, window_n = 0.0, 0
                        cb.on_step(step, record)
                    else:
                        cb.on_step(step, {"loss": loss.item()})
            train_time += time.perf_counter() - t0

            val = _evaluate(model, val_ids, splits.validation.labels, splits.label_names, cfg, accelerator, precision)
            record = {"event": "eval", "split": "validation", "epoch": epoch, "step": step,
                      **{k: val[k] for k in ("loss", "accuracy", "macro_f1", "n")}}
            metrics.add(record)
            cb.on_eval(record)
            if val["accuracy"] > best_acc:
                best_acc, best_epoch, best_val = val["accuracy"], epoch, val
                unwrapped = accelerator.unwrap_model(model)
                best_state = trainable_state_dict(unwrapped)
                if accelerator.is_main_process:
                    tmp = run_dir / f".{runs.ADAPTER_DIR}.tmp"
                    unwrapped.save_pretrained(tmp)
                    runs.replace_dir(tmp, run_dir / runs.ADAPTER_DIR)
            elif tc.early_stopping_patience is not None and epoch - best_epoch >= tc.early_stopping_patience:
                stopped_early = epoch  # no better validation accuracy for `patience` epochs
                break

        # Test metrics come from the best epoch's weights, chosen on validation only.
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.load_state_dict(best_state, strict=False)
        test = None
        if splits.test is not None:
            test_ids = tokenize(splits.test.texts, tokenizer, cfg.data.max_length)
            test = _evaluate(model, test_ids, splits.test.labels, splits.label_names, cfg, accelerator, precision)
            metrics.add({"event": "eval", "split": "test", "epoch": best_epoch, "step": step,
                         **{k: test[k] for k in ("loss", "accuracy", "macro_f1", "n")}})
            cb.on_eval(metrics.records[-1])

        plots.learning_curve(metrics.records, run_dir / runs.CURVE_FILE)
        info.update(
            status="complete",
            device=str(accelerator.device),
            precision=precision,
            best_epoch=best_epoch,
            stopped_early_at_epoch=stopped_early,
            optimizer_steps=step,
            metrics={"validation": {k: best_val[k] for k in ("accuracy", "macro_f1", "loss", "n")},
                     "test": {k: test[k] for k in ("accuracy", "macro_f1", "loss", "n")} if test else None},
            throughput={"train_examples_per_s": examples_seen / train_time if train_time else None,
                        "train_tokens_per_s": tokens_seen / train_time if train_time else None,
                        "train_seconds": train_time},
            wall_time_s=time.perf_counter() - t_start,
        )
        if accelerator.is_main_process:
            write_extras(run_dir, splits, info)
            runs.write_json(run_dir / runs.RUN_FILE, info)  # last write: marks the run complete
        return TrainResult(run_dir, best_epoch, best_val, test, counts.trainable, metrics.records)
    except BaseException as e:
        # Whatever stopped the run (error, Ctrl-C), the directory must not look complete.
        info.update(status="failed", error=str(e) or type(e).__name__)
        runs.write_json(run_dir / runs.RUN_FILE, info)
        raise


def write_extras(run_dir: Path, splits: Splits, info: dict[str, Any], per_class: int = 3) -> None:
    """What ``serve`` and ``report`` show, written before the run is marked complete:
    examples.json (a few short validation texts per class, for the web page's example buttons)
    and report.html / report.md. A report that cannot be made is recorded in run.json
    (``report_error``), never a reason to lose a finished training."""
    from . import report
    from .serve import EXAMPLES_FILE

    examples: dict[str, list[str]] = {n: [] for n in splits.label_names}
    for text, label in sorted(zip(splits.validation.texts, splits.validation.labels.tolist()),
                              key=lambda tl: len(tl[0]) > 300):  # short texts first, else file order
        bucket = examples[splits.label_names[label]]
        if len(bucket) < per_class:
            bucket.append(text)
    runs.write_json(run_dir / EXAMPLES_FILE, examples)
    split, data = ("test", splits.test) if splits.test is not None else ("validation", splits.validation)
    try:
        report.write_report(run_dir, info=info, examples=data, split=split, source=data.source)
    except Exception as e:  # noqa: BLE001 - the adapter and metrics are saved; say why the report is missing
        info["report_error"] = f"{type(e).__name__}: {e}"
