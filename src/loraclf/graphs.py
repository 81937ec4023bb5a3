"""CUDA graphs for the training step: one captured forward + backward per batch shape.

Why: on a GPU, a LoRA step of roberta-base over 32 AG News rows is a few milliseconds of
arithmetic but ~38 ms of Python and kernel launches (BENCHMARKS.md, "GPU check 2"): the host,
not the GPU, sets the pace, and torch.compile did not change that. A CUDA graph records the
step's kernels once and replays all of them with one launch (6.2x on an H200: BENCHMARKS.md,
"GPU check 3").

What is captured: zeroing the gradients, the forward under autocast, the loss, the backward
(gradients accumulate into ``.grad`` tensors that exist before the capture, so they keep their
addresses for the eager optimizer to read) and gradient clipping. The optimizer step and the
learning-rate schedule stay eager: fused AdamW is a few launches, and the learning rate stays a
Python float, so schedulers and checkpoints work unchanged.

Shapes: a graph replays fixed shapes, so each batch shape gets its own graph, captured the
second time that shape is seen; the first time runs eagerly on a side stream, which is the
warm-up PyTorch's CUDA-graph notes ask for (cuBLAS handles, lazy inits). The training loop rounds
batch lengths up to ``data.pad_to_multiple_of`` so that few shapes occur. All graphs share one
memory pool: nothing a graph allocates outlives its replay except its output (the loss), which
the caller consumes (enqueues work on) before the next replay can overwrite it.

The same class replays inference forwards (``loraclf.predict.forward_graphs``: no parameters,
logits out, cloned by the caller). A Predictor may be shared by threads, so a call holds
``lock`` from copying its batch into the graph's inputs through the replay, and
``loraclf.predict.logits_for`` holds it for a whole prediction, the clones of the outputs
included (a capture also fails if another thread uses the GPU meanwhile).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from .errors import TrainingError, brief

Batch = dict[str, torch.Tensor]
# padded lengths round up to a multiple of this when graphs are on (unless data.pad_to_multiple_of
# says otherwise): one graph per batch shape, so few shapes
PAD_MULTIPLE = 16
T = TypeVar("T")


class Backend(Protocol):
    """How a step is run eagerly and how it is captured (CUDA graphs; tests use a stand-in)."""

    def eager(self, fn: Callable[[], T]) -> T: ...

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record ``fn``; return (replay, output tensor that every replay refills)."""
        ...


class CudaGraphBackend:
    """``device``: the GPU the step's tensors live on (None: the current one). Streams and the
    capture must be on that GPU: a capture on another (the current device's side stream) while the
    kernels go to this one's records an empty graph, whose replays would do nothing."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None or device.index is None \
            else device
        self.stream = torch.cuda.Stream(device=self.device)
        self.pool: object | None = None

    def eager(self, fn: Callable[[], T]) -> T:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):  # (also makes the stream's device the current one)
            out = fn()
        current.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        # On this backend's own stream: torch.cuda.graph's default capture stream is one per
        # process, made on whichever GPU was current at the first capture
        with torch.cuda.device(self.device):
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    out = fn()
            except BaseException:
                # when capture_end raises, torch.cuda.graph's exit skips restoring the stream
                torch.cuda.set_stream(current)
                raise
        self.pool = graph.pool()
        return graph.replay, out


@dataclass
class _Captured:
    replay: Callable[[], None]
    inputs: Batch
    output: torch.Tensor


class StepGraphs:
    """Run ``step(batch) -> tensor`` with the gradients of ``params`` zeroed first, from a CUDA
    graph once its batch shape has been seen ``warmup`` times.

    Training: ``step`` does forward, backward and clipping and returns the loss; ``params``, the
    trainable parameters, get ``.grad`` tensors created here (zeros) and then only ever written
    in place. Inference: ``step`` is a forward under ``torch.no_grad`` returning logits, and
    ``params`` is empty. ``step`` must not synchronise with the host (no ``.item()``, no
    data-dependent Python branches), or the capture fails. At most ``max_graphs`` shapes are
    captured; rarer shapes beyond that stay eager. A failed capture raises
    :class:`TrainingError` when ``strict``; otherwise capturing stops (``disabled`` says why)
    and every step from then on runs eagerly. ``device``: for the default backend.
    """

    def __init__(self, step: Callable[[Batch], torch.Tensor], params: list[torch.Tensor],
                 backend: Backend | None = None, warmup: int = 1, max_graphs: int = 32, strict: bool = True,
                 device: torch.device | None = None):
        self.strict = strict
        self.disabled: str | None = None  # why capturing stopped (strict=False only)
        self.step = step
        self.params = params
        self.backend = backend if backend is not None else CudaGraphBackend(device)
        self.lock = threading.RLock()  # (re-entrant: logits_for holds it around its calls)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: collections.Counter[tuple] = collections.Counter()
        self.replays = 0
        self.eager_steps = 0

    @staticmethod
    def shape_key(batch: Batch) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))

    def _run(self, batch: Batch) -> torch.Tensor:
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if grads:
            torch._foreach_zero_(grads)
        return self.step(batch)

    def _eager(self, batch: Batch) -> torch.Tensor:
        self.eager_steps += 1
        return self.backend.eager(lambda: self._run(batch))

    def __call__(self, batch: Batch) -> torch.Tensor:
        """``step`` over ``batch``; returns its output (a tensor that the next call may
        overwrite: read, accumulate or clone it before calling again)."""
        with self.lock:
            return self._call(batch)

    @property
    def active(self) -> bool:
        """Whether steps are (still) captured and replayed: False once a failed capture stopped it."""
        return self.disabled is None

    def _call(self, batch: Batch) -> torch.Tensor:
        key = self.shape_key(batch)
        captured = self.graphs.get(key)
        if captured is None:
            self.seen[key] += 1
            if self.disabled or self.seen[key] <= self.warmup or len(self.graphs) >= self.max_graphs:
                return self._eager(batch)
            inputs = {name: t.clone() for name, t in batch.items()}
            try:
                replay, output = self.backend.capture(lambda: self._run(inputs))
            except RuntimeError as e:
                shape = {name: tuple(t.shape) for name, t in batch.items()}
                why = (f"capturing the step for batch shape {shape} failed "
                       f"({brief(e)})")
                if self.strict:
                    raise TrainingError(f"train.cuda_graphs: {why}; most often something in the model's forward or "
                                        "backward reads a GPU value on the host", where="train.cuda_graphs",
                                        fix="set --train.cuda_graphs false") from e
                # nothing ran during the failed capture: this step and all later ones run eagerly
                self.disabled = why
                return self._eager(batch)
            captured = self.graphs[key] = _Captured(replay, inputs, output)
        for name, t in batch.items():
            captured.inputs[name].copy_(t, non_blocking=True)
        captured.replay()
        self.replays += 1
        return captured.output

    def summary(self) -> dict[str, object]:
        """What happened, for run.json: graphs captured, steps replayed / run eagerly, and why
        capturing stopped if it did."""
        return {"graphs": len(self.graphs), "replays": self.replays, "eager_steps": self.eager_steps,
                "disabled": self.disabled}
