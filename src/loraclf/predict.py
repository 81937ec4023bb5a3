"""Batched inference: the one prediction path used by evaluate, predict, serve and training's
evaluation. Rows are sorted by length so each batch pads little; LoRA is merged into the
weights so inference costs exactly what the base model costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import checkpoint
from .data import PadCollator, sorted_batches, tokenize, unicode_problem
from .errors import ConfigError, DataError, RunError, brief
from .graphs import PAD_MULTIPLE, StepGraphs
from .model import (build_model, check_base, load_adapter, load_base, load_model_config, load_tokenizer, load_trained,
                    usable_length)
from .precision import autocast, cast_frozen_matmul_weights, choose_precision
from .runs import Run, open_run


def forward_graphs(model: torch.nn.Module, device: torch.device, precision: str, backend: Any = None) -> StepGraphs:
    """CUDA graphs of ``model``'s inference forward, one per batch shape (see loraclf.graphs):
    for a process that predicts many batches of recurring shapes, e.g. a server."""

    @torch.no_grad()
    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _logits(model, batch, device, precision)

    return StepGraphs(forward, [], backend=backend, strict=False, device=device if backend is None else None)


def use_cuda_graphs(requested: bool | None, device: torch.device, as_trained: bool = False) -> bool:
    """Whether a Predictor replays each batch shape's forward from a CUDA graph (a shape runs
    eagerly the first time it is seen, then from its graph; lengths round up to PAD_MULTIPLE).
    ``requested`` None: on for a CUDA device, as on an H200 that was 3.5x the eager forward at
    batch 32 on a first pass over the rows and 3.9x on a second (BENCHMARKS.md, GPU check 4);
    but not ``as_trained``, which reproduces training's own evaluation (unrounded lengths).
    True insists: a ConfigError elsewhere than on CUDA."""
    if requested and device.type != "cuda":
        raise ConfigError([f"CUDA graphs need a CUDA device, not {device}"], where="predict",
                          fix="leave CUDA graphs at auto or off on a machine without a CUDA GPU")
    return device.type == "cuda" and not as_trained if requested is None else requested


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
            precision: str) -> torch.Tensor:
    """float32 logits [B, C] of one batch: the one forward that eager and graphed inference share."""
    with autocast(device, precision):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()


@torch.no_grad()
def logits_for(model: torch.nn.Module, input_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
               device: torch.device, precision: str = "fp32", prefix: tuple[Any, Any] | None = None,
               max_tokens: int | None = None, graphs: StepGraphs | None = None,
               max_width: int | None = None) -> np.ndarray:
    """Class logits, float32 [N, C], in the order of ``input_ids``; batches of at most
    ``batch_size`` rows and ``max_tokens`` padded tokens. ``prefix``: (FrozenPrefix,
    PrefixStore) holding these rows' hidden states below the first trained layer (training's
    validation; see loraclf.prefix). ``graphs``: :func:`forward_graphs` of this model, to run
    each batch shape from a CUDA graph (lengths then round up to multiples of ``PAD_MULTIPLE``,
    but not past ``max_width``, the model's longest input, where position embeddings end; None:
    the longest row's length, which leaves the widest batch unrounded)."""
    graphed = graphs is not None and graphs.active and prefix is None
    collate = PadCollator(pad_id, PAD_MULTIPLE if graphed else None,
                          max_width or max((len(x) for x in input_ids), default=None))
    # Logits stay on the device until the end: reading each batch back would make the host wait
    # for the GPU before it can pad and launch the next batch.
    parts: list[tuple[list[int], torch.Tensor]] = []
    # With graphs the whole call holds their lock: another thread's copies or allocations on the
    # GPU while a shape is being captured would fail the capture (it refuses other threads' calls)
    with graphs.lock if graphed else contextlib.nullcontext():
        was_training = model.training
        model.eval()
        try:
            with prefix[0].active() if prefix is not None else contextlib.nullcontext():
                for idx in sorted_batches([len(x) for x in input_ids], batch_size, max_tokens, collate.width):
                    batch = collate([(input_ids[i], -1) for i in idx])
                    if prefix is not None:
                        prefix[0].feed(prefix[1].batch(idx, batch["input_ids"].shape[1]).to(device))
                    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                    if graphed:
                        logits = graphs(inputs).clone()  # the graph's output is refilled by its next replay
                    else:
                        logits = _logits(model, inputs, device, precision)
                    parts.append((idx, logits))
        finally:
            model.train(was_training)
        if not parts:
            return np.empty((0, 0), dtype=np.float32)
        out = np.empty((len(input_ids), parts[0][1].shape[-1]), dtype=np.float32)
        out[np.concatenate([idx for idx, _ in parts])] = torch.cat([t for _, t in parts]).cpu().numpy()
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Predictor:
    """A trained classifier ready for inference (LoRA merged, eval mode).

    ``as_trained``: compute as training's evaluation did, not as fast as possible: in bf16 the
    fp32 weights under autocast (frozen linear weights stored in bf16, as training stores them)
    rather than every weight in bf16; with :meth:`from_run` also LoRA not merged and batches of
    the run's ``train.eval_batch_size``. Then a run's own test split gives the metrics run.json
    recorded (bf16 inference differs by ~1e-3 in the logits: enough to move some rows; a run
    trained with ``train.compile`` is reproduced to float rounding).

    ``cuda_graphs``: see :func:`use_cuda_graphs` (None: on for a CUDA device unless ``as_trained``)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, label_names: list[str], max_length: int,
                 batch_size: int = 64, device: torch.device | str | None = None, precision: str = "auto",
                 max_tokens: int | None = None, cuda_graphs: bool | None = None, as_trained: bool = False):
        self.device = _device(device)
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ConfigError([f"{name} must be an integer >= 1 (got {value!r})"], where=name,
                                  fix=f"give {name} as a positive integer")
        self.precision = choose_precision(precision, self.device)
        model = model.to(self.device).eval()
        if self.precision == "bf16" and as_trained:
            cast_frozen_matmul_weights(model)
        elif self.precision == "bf16":
            # Inference holds the weights in bf16 rather than autocasting fp32 weights: autocast
            # re-casts every weight on every forward, which made small GPU batches slower than
            # fp32 (BENCHMARKS.md). Logits are returned as float32 either way.
            model = model.to(torch.bfloat16)
        self.model = model
        self.tokenizer = tokenizer
        self.label_names = label_names
        self.max_length = usable_length(max_length, getattr(model, "config", None))
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.checkpoint: Path | None = None  # the checkpoint folder the weights came from (from_run)
        self.trained_in: str | None = None  # the precision the weights trained in, where known (from_run)
        use = use_cuda_graphs(cuda_graphs, self.device, as_trained)
        self.graphs = forward_graphs(model, self.device, self.precision) if use else None

    @classmethod
    def from_run(cls, run: Run | str | Path, batch_size: int | None = None, device: torch.device | str | None = None,
                 precision: str | None = None, merge: bool = True, from_checkpoint: bool = False,
                 max_tokens: int | None = None, cuda_graphs: bool | None = None, as_trained: bool = False) -> Predictor:
        """Load a finished run; ``from_checkpoint``: an unfinished one, with the best weights of its
        newest checkpoint (the current weights when no epoch has been evaluated yet), whose folder
        is then the predictor's ``checkpoint``. ``batch_size``: None = 64, or with ``as_trained``
        (see :class:`Predictor`, which implies ``merge=False``) the run's ``train.eval_batch_size``.
        ``precision``: None = "auto" (the fastest this hardware runs well), or with ``as_trained``
        the precision the run trained in (the predictor's ``trained_in``: run.json's, or for an
        unfinished run its checkpoint's)."""
        if not isinstance(run, Run):
            run = open_run(run, allow_incomplete=from_checkpoint)
        if batch_size is None:
            batch_size = run.cfg.train.eval_batch_size if as_trained else 64
        merge = merge and not as_trained
        check_base(run.cfg.model, run.info.get("base_model_files"), run.path)
        config = load_model_config(run.cfg.model, run.label_names)
        ckpt, trained_in = None, run.info.get("precision")
        if from_checkpoint:
            # an interrupted run's run.json has no precision yet; its checkpoint knows it
            model, ckpt, ckpt_precision = _model_from_checkpoint(run, config)
            trained_in = trained_in or ckpt_precision
        else:
            model = load_adapter(load_base(run.cfg.model, config), run.adapter_dir)
        if precision is None:
            precision = (trained_in if as_trained else None) or "auto"
        if merge:
            model = model.merge_and_unload()
        tokenizer = load_tokenizer(run.cfg.model, path=str(run.tokenizer_dir))
        predictor = cls(model, tokenizer, run.label_names, run.cfg.data.max_length, batch_size, device, precision,
                        max_tokens, cuda_graphs, as_trained)
        predictor.checkpoint = ckpt
        predictor.trained_in = trained_in
        return predictor

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"text {i + 1} is not a string ({type(t).__name__})", where="input",
                                fix="give every text as a string")
            if not t.strip():
                raise DataError(f"text {i + 1} is empty", where="input", fix="give every text some characters")
            problem = unicode_problem(t)
            if problem:
                raise DataError(f"text {i + 1} {problem}", where="input", fix="give the input as valid UTF-8 text")
        # stripped as training's texts were (data.table_texts): a leading space is a token of its
        # own to a byte-level BPE tokenizer, one the model never saw
        return tokenize([t.strip() for t in texts], self.tokenizer, self.max_length)

    def logits(self, texts: Sequence[str] | str) -> np.ndarray:
        """Float32 [N, C]; a single string is one text (N = 1), as in transformers' pipelines."""
        texts = _as_list(texts)
        if not texts:
            return np.empty((0, len(self.label_names)), dtype=np.float32)
        return logits_for(self.model, self.encode(texts), self.tokenizer.pad_token_id, self.batch_size,
                          self.device, self.precision, max_tokens=self.max_tokens, graphs=self.graphs,
                          max_width=self.max_length)

    def predict(self, texts: Sequence[str] | str, top_k: int = 1) -> list[dict[str, Any]]:
        """Per text: label, probabilities of every class, and the ``top_k`` classes. A single
        string is one text (a list of one result), not a sequence of characters."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 (got {top_k!r})")  # as the CLI's --top-k
        texts = _as_list(texts)
        probs = softmax(self.logits(texts))
        k = min(int(top_k), len(self.label_names))
        results = []
        for text, p in zip(texts, probs):
            order = np.argsort(-p, kind="stable")[:k]
            results.append({
                "text": text,
                "label": self.label_names[int(order[0])],
                "probabilities": {n: float(v) for n, v in zip(self.label_names, p)},
                "top_k": [{"label": self.label_names[int(i)], "probability": float(p[i])} for i in order],
            })
        return results


def _as_list(texts: Sequence[str] | str) -> list[str]:
    """A single string is one text (as in transformers' pipelines); any other sequence — a list, a
    NumPy array, a pandas Series — its texts (``if not texts`` is ambiguous on the last two)."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray) and texts.ndim == 0:  # np.array("text"): one text, not iterable
        return [texts.item()]
    # bytes iterate as integers, a dict as its keys, a set in no fixed order: outputs that would
    # not line up with what the caller meant
    kind = ("bytes" if isinstance(texts, (bytes, bytearray, memoryview)) else
            "a mapping" if isinstance(texts, Mapping) else
            "a set" if isinstance(texts, (set, frozenset)) else
            "a table" if hasattr(texts, "columns") else None)  # a DataFrame iterates as its column names
    if kind is not None:
        raise DataError(f"texts are {kind}, not a string or a sequence of strings", where="input",
                        fix="decode bytes to str; pass a list (a dict's values, sorted(a set), a DataFrame's "
                            "text column: df['text'])")
    return list(texts)


def _device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device (None: the GPU if there is one); one that is not a device name,
    or a GPU this torch cannot reach, is a ConfigError (torch raised RuntimeError or AssertionError)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError([f"device {device!r} is not a device ({brief(e, 120)})"], where="device",
                          fix="use 'cpu', 'cuda', 'cuda:N' or None (the GPU if there is one)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError([f"device {device!r} is not available: this torch sees "
                           f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s)"],
                          where="device", fix="use device='cpu', or None for the GPU if there is one")
    return dev


def _model_from_checkpoint(run: Run, config: Any) -> tuple[torch.nn.Module, Path, str | None]:
    """The model with the newest checkpoint's best (else current) weights, that checkpoint's
    folder, and the precision the run trained in (None in checkpoints older than that record)."""
    path = checkpoint.latest(run.path)
    if path is None:
        raise RunError("run has no checkpoint", where=str(run.path), fix="use a run that trained at least one step")
    if not checkpoint.readable(path):  # without best.safetensors the current weights passed for the best
        raise RunError(f"the newest checkpoint ({path.name}) is damaged or lacks a file", where=str(run.path),
                       fix=f"resume the run (loraclf train --resume {run.path} goes back to an older checkpoint), "
                           "or train it again")
    loaded = checkpoint.load(path)
    model = build_model(run.cfg.model, run.cfg.lora, config)
    load_trained(model, loaded.best if loaded.best is not None else loaded.trainable, path)
    return model, path, loaded.loop.precision
