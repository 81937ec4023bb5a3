"""Several processes training one run (``accelerate launch`` / ``torchrun``, one per GPU).

accelerate shards the batches and averages the gradients; what is left to loraclf is which
process does what. The rule: the main process alone writes the run directory (config, metrics,
checkpoints, adapter, run.json) and evaluates; the others train their share of the batches
and receive what the main process decided, so that every process takes the same branch at
every step. A process that waits in a collective for a peer that has raised would hang, so
work done on the main process alone hands its failure to the others (:func:`on_main`).

In a single process every function here is a no-op pass-through.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env

from .errors import ConfigError, LoraclfError

T = TypeVar("T")


class OtherProcessFailed(LoraclfError):
    """Raised in the other processes when the main process failed; the main process reports why."""


def state() -> PartialState:
    """This process's place in the launch. ACCELERATE_USE_CPU (``accelerate launch --cpu``) is
    read by accelerate's Accelerator only: the shared state must be created with it, or processes
    launched on CPUs would each train alone, unaware of the others."""
    st = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE") or 1)
    if st.num_processes != launched:
        # several processes training the same run each on their own would race for its folder
        raise ConfigError([f"launched as {launched} processes, but accelerate joins {st.num_processes}: "
                           "without GPUs it joins processes only when asked to"], where="launch",
                          fix="set ACCELERATE_USE_CPU=1 to train on CPUs in several processes, or launch one")
    return st


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on the main process; every process returns its result (which must pickle).
    If it raises, the main process re-raises and the others raise :class:`OtherProcessFailed`."""
    st = state()
    if st.num_processes == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if st.is_main_process:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - every failure must reach the others, then go on up
            error, box[0] = e, ("failed", str(e) or type(e).__name__)
    broadcast_object_list(box, from_process=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "failed":
        raise OtherProcessFailed(f"the main process failed: {value}", where=f"process {st.process_index}")
    return value


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a stop request, which signals deliver
    to each process at a slightly different step)."""
    st = state()
    if st.num_processes == 1:
        return flag
    votes = torch.tensor([int(flag)], device=st.device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return bool(votes.item())


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all processes (``values`` itself in one process)."""
    st = state()
    if st.num_processes == 1:
        return values
    values = values.clone()
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def gather(obj: T) -> list[T]:
    """``obj`` of every process, in process order, on every process."""
    if state().num_processes == 1:
        return [obj]
    return gather_object([obj])
