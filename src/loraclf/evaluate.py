"""Metrics of a classifier on labelled examples (scikit-learn) and evaluation of a run."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from . import plots
from .config import data_config
from .data import Examples, is_hub_name, load_eval_split, same_data
from .errors import DataError, brief
from .predict import Predictor
from .runs import EVAL_DIR, Run, open_run, write_json


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """accuracy, macro_f1, per-class precision/recall/f1/support, confusion matrix (all classes).

    macro_f1 averages over the classes that occur in the data or the predictions, as scikit-learn
    (and so HF ``evaluate``) does by default: a test file with two of four classes, predicted
    perfectly, has macro-F1 1.0, not 0.5. A class that occurs in neither has no precision, recall
    or F1 (None), only its support, 0.
    """
    labels = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    seen = set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist())

    def value(i: int, v: np.ndarray) -> float | None:
        return float(v[i]) if i in seen else None

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(seen), average="macro", zero_division=0)),
        "per_class": {n: {"precision": value(i, p), "recall": value(i, r), "f1": value(i, f), "support": int(s[i])}
                      for i, n in enumerate(label_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def logits_metrics(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """:func:`classification_metrics` of float32 logits [N, C] plus ``loss``, their mean cross-entropy
    with ``labels`` [N] (what training records for its splits)."""
    import torch

    out = classification_metrics(labels, logits.argmax(-1), label_names)
    out["loss"] = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return out


def evaluate_examples(predictor: Predictor, examples: Examples) -> dict[str, Any]:
    return logits_metrics(predictor.logits(examples.texts), examples.labels, predictor.label_names)


def evaluate_run(run_dir: str | Path, data_overrides: dict[str, Any] | None = None, batch_size: int | None = None,
                 precision: str | None = None, write: bool = True, from_checkpoint: bool = False,
                 max_tokens: int | None = None) -> dict[str, Any]:
    """Evaluate a finished run on its configured test split, or on ``data_overrides['test']``.
    ``precision``: None = the one the run trained (and recorded its metrics) in. The model
    computes as training evaluated (``Predictor(as_trained=True)``; ``batch_size`` None = the
    run's ``train.eval_batch_size``), so the run's own test split gives run.json's metrics.

    Returns the metrics plus ``split`` and ``source``; with ``write``, saves
    RUN_DIR/eval/<name>.json and <name>_confusion.png (see :func:`evaluation_name`) and adds
    ``saved_to`` (that JSON's path). A run the caller cannot write to (a shared, read-only
    model store) still gets its metrics: then ``saved_to`` is None and ``save_error`` says why.
    """
    run = open_run(run_dir, allow_incomplete=from_checkpoint)
    overrides = dict(data_overrides or {})
    if "test" in overrides:
        # the run's row limit and file format were for the run's own data; another test source
        # is read whole, its format told by its own name and content
        overrides.setdefault("max_eval_samples", None)
        overrides.setdefault("format", "auto")
    data_cfg = data_config(run.cfg.data.model_dump(), overrides)
    if data_cfg.test is None:
        cleared = "test" in (data_overrides or {})
        raise DataError("--data.test is empty" if cleared else "the run has no test split configured",
                        where="command line" if cleared else str(run.path),
                        fix="pass one with --data.test PATH_OR_NAME")
    named = None if "test" in (data_overrides or {}) else "data.test in the run's config.yaml, or pass --data.test PATH"
    examples = load_eval_split(data_cfg, data_cfg.test, run.label_names, flag=named,
                               int_labels=run.info.get("int_labels", True))
    predictor = Predictor.from_run(run, batch_size=batch_size, precision=precision,
                                   from_checkpoint=from_checkpoint, max_tokens=max_tokens, as_trained=True)
    trained_in = predictor.trained_in
    result = evaluate_examples(predictor, examples)
    # the checkpoint the predictor loaded (a training still running may have written a newer one since)
    ckpt = predictor.checkpoint
    result.update(split="test", source=data_cfg.test, precision=predictor.precision,
                  weights=str(ckpt) if ckpt is not None else "adapter")
    # how the rows were read, where not as the run reads them: recorded, and kept apart in eval/
    read_as = {k: v for k, v in (data_overrides or {}).items() if k in _READING_KEYS
               and getattr(data_cfg, k) != getattr(run.cfg.data, k)}
    if read_as:
        result["read_as"] = read_as
    if (where := source_path(data_cfg.test)) is not None:
        result["source_path"] = where
    fingerprint = getattr(examples, "fingerprint", None)
    if fingerprint:
        result["data_fingerprint"] = {k: v for k, v in fingerprint.items() if k != "path"}
        # the run's own test source, changed since training tested on it: metrics that differ
        # from run.json's then say nothing about the model (a moved copy is compared by content)
        tested = (run.info.get("data") or {}).get("test")
        own = "test" not in overrides or overrides["test"] == run.cfg.data.test or (
            where is not None and where == source_path(run.cfg.data.test))
        if own and tested is not None:
            result["same_data_as_training_test"] = same_data(fingerprint, tested)
    if write:
        # a limit at or above the file's rows took them all: the evaluation is the full one
        subset = len(examples) if examples.sampled_from is not None else None
        variant = [f"{k}-{'+'.join(v) if isinstance(v, list) else v}" for k, v in read_as.items()]
        if trained_in is not None and predictor.precision != trained_in:
            variant.append(predictor.precision)  # an fp32 and a bf16 evaluation do not replace each other
        try:
            # absolute, however RUN_DIR was given: the caller may read it from another directory
            result["saved_to"] = str(write_evaluation(run, result, data_cfg.test, subset,
                                                      ckpt.name if ckpt is not None else None, variant).absolute())
        except OSError as e:
            result.update(saved_to=None, save_error=f"cannot write {run.path / EVAL_DIR} ({e.strerror or e})")
    return result


def source_path(source: str) -> str | None:
    """The absolute path of a local data file (what tells two files of the same name apart);
    None for a hub dataset."""
    return None if is_hub_name(source) else str(Path(source).expanduser().resolve())


# data options that change how an evaluation file's rows are read (its other options do not)
_READING_KEYS = ("text_columns", "label_column", "format", "max_text_chars")


def evaluation_name(run: Run, source: str, max_samples: int | None = None, checkpoint_name: str | None = None,
                    variant: list[str] | None = None) -> str:
    """The file stem of an evaluation in RUN_DIR/eval/: the data file's name (``test.csv``) or the
    hub dataset's name and split (``ag_news.test``), plus ``.n<N>`` for a ``max_eval_samples``
    subset, so a subset never replaces a full evaluation, ``.step-<N>`` for an evaluation of
    an unfinished run's checkpoint, which must not pass for the finished run's, and ``variant``
    (``.text_columns-title``, ``.bf16``: rows read or computed otherwise than the run's). A different file
    with the same name gets a short hash of its path, so evaluating ``a/test.csv`` and then
    ``b/test.csv`` keeps both."""
    where = source_path(source)
    if where is None:
        dataset, _, split = source.partition(":")
        name = Path(dataset).name + (f".{split}" if split else "")
    else:
        name = Path(source).name.removesuffix(".gz")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "test"
    if max_samples is not None:
        name += f".n{max_samples}"
    if checkpoint_name is not None:
        name += f".{checkpoint_name}"
    for part in variant or []:
        name += "." + (re.sub(r"[^A-Za-z0-9_.+-]+", "_", part) or "_")
    if where is not None and _evaluated_elsewhere(run.path / EVAL_DIR / f"{name}.json", where):
        name += "." + hashlib.sha256(where.encode()).hexdigest()[:8]
    return name


def _evaluated_elsewhere(existing: Path, where: str) -> bool:
    """Does ``existing`` hold the evaluation of a file other than ``where``? (A file written before
    evaluations recorded ``source_path`` counts as this one's: it is replaced, as it was then.)"""
    try:
        other = json.loads(existing.read_text(encoding="utf-8")).get("source_path")
    except (OSError, ValueError, AttributeError):
        return False
    return other is not None and other != where


def write_evaluation(run: Run, result: dict[str, Any], source: str, max_samples: int | None = None,
                     checkpoint_name: str | None = None, variant: list[str] | None = None) -> Path:
    out = run.path / EVAL_DIR
    out.mkdir(exist_ok=True)
    name = evaluation_name(run, source, max_samples, checkpoint_name, variant)
    try:
        plots.confusion_matrix(result["confusion_matrix"], run.label_names, out / f"{name}_confusion.png",
                               f"confusion matrix: {name} (n={result['n']})")
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - a figure matplotlib cannot draw must not cost the metrics
        result["plot_error"] = f"{type(e).__name__}: {brief(e, 200)}"
    write_json(out / f"{name}.json", result)  # last: a JSON there means the evaluation was saved whole
    return out / f"{name}.json"
