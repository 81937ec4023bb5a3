"""Metrics of a classifier on labelled examples (scikit-learn) and evaluation of a run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from . import checkpoint, plots
from .config import data_config
from .data import Examples, load_eval_split
from .errors import DataError
from .predict import Predictor
from .runs import EVAL_DIR, Run, open_run, write_json


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """accuracy, macro_f1 (over all classes), per-class precision/recall/f1/support, confusion matrix."""
    labels = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, n in enumerate(label_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def evaluate_examples(predictor: Predictor, examples: Examples) -> dict[str, Any]:
    logits = predictor.logits(examples.texts)
    return classification_metrics(examples.labels, logits.argmax(-1), predictor.label_names)


def evaluate_run(run_dir: str | Path, data_overrides: dict[str, Any] | None = None, batch_size: int = 64,
                 precision: str = "auto", write: bool = True, from_checkpoint: bool = False,
                 max_tokens: int | None = None) -> dict[str, Any]:
    """Evaluate a finished run on its configured test split, or on ``data_overrides['test']``.

    Returns the metrics plus ``split`` and ``source``; with ``write``, saves
    RUN_DIR/eval/<name>.json and <name>_confusion.png (<name>: the source's file or dataset name,
    plus ``.n<N>`` for a ``max_eval_samples`` subset, so a subset never replaces a full evaluation).
    """
    run = open_run(run_dir, allow_incomplete=from_checkpoint)
    data_cfg = data_config(run.cfg.data.model_dump(), data_overrides or {})
    if data_cfg.test is None:
        raise DataError("the run has no test split configured", where=str(run.path),
                        fix="pass one with --data.test PATH_OR_NAME")
    examples = load_eval_split(data_cfg, data_cfg.test, run.label_names)
    predictor = Predictor.from_run(run, batch_size=batch_size, precision=precision, from_checkpoint=from_checkpoint,
                                   max_tokens=max_tokens)
    result = evaluate_examples(predictor, examples)
    result.update(split="test", source=data_cfg.test, precision=predictor.precision,
                  weights=str(checkpoint.latest(run.path)) if from_checkpoint else "adapter")
    if write:
        write_evaluation(run, result, data_cfg.test, data_cfg.max_eval_samples)
    return result


def write_evaluation(run: Run, result: dict[str, Any], source: str, max_samples: int | None = None) -> Path:
    out = run.path / EVAL_DIR
    out.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.split(":")[0]).name.removesuffix(".gz")) or "test"
    if max_samples is not None:
        name += f".n{max_samples}"
    write_json(out / f"{name}.json", result)
    plots.confusion_matrix(result["confusion_matrix"], run.label_names, out / f"{name}_confusion.png",
                           f"confusion matrix: {name} (n={result['n']})")
    return out / f"{name}.json"
