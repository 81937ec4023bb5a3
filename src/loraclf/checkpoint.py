"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint is a directory RUN_DIR/checkpoints/step-NNNNNNNN/ holding
    trainable.safetensors   the trainable tensors (LoRA + head) now
    best.safetensors        the trainable tensors of the best epoch so far (if any)
    optimizer.safetensors   the optimizer's per-parameter tensors (AdamW moments, step)
    rng.safetensors         torch CPU (and CUDA) generator states
    rng-N.safetensors       the same for process N > 0 of a multi-process run
    state.json              loop position, best-so-far, optimizer hyper-parameters,
                            scheduler, python/numpy RNG states
Tensors go through safetensors and the rest through JSON: a checkpoint never needs pickle to
load. It is written into a temporary directory and renamed into place, so a kill during the
write leaves the previous checkpoint intact and no half-written one that looks valid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RunError, brief
from .runs import share_modes, unreadable_safetensors, write_errors_as_oserror

CHECKPOINT_DIR = "checkpoints"
_DONE = "state.json"  # written last inside the temporary directory


@dataclass
class LoopState:
    """Where the loop stands. ``epoch`` is the epoch in progress (1-based) and ``batch`` the
    number of its micro-batches already trained on."""

    epoch: int = 1
    batch: int = 0
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    best_val: dict[str, Any] = field(default_factory=dict)
    train_time: float = 0.0
    examples_seen: int = 0
    tokens_seen: int = 0
    metrics_lines: int = 0
    window_loss: float = 0.0
    window_n: int = 0
    stopped_early: int | None = None
    # how the run grouped its micro-batches (train.fuse_accumulation resolved); a resumed run keeps
    # it, even on another device whose default differs, or ``batch`` would count other batches
    fused: bool | None = None
    # the precision it trained in (train.precision resolved), kept for the same reason
    precision: str | None = None
    # how many processes trained it (None: one, in checkpoints written before this was recorded);
    # ``batch`` counts one process's share of the batches
    processes: int | None = None
    # True: the sampler grouped rows per optimizer step (None: per micro-batch, in checkpoints
    # written before), which decides the order a resumed epoch goes on in
    step_groups: bool | None = None


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: tensors (torch, CUDA) and JSON-able values (numpy, python)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Put back generator states :func:`rng_state` took."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _rng_file(process: int) -> str:
    return "rng.safetensors" if process == 0 else f"rng-{process}.safetensors"


def save(run_dir: Path, loop: LoopState, trainable: dict[str, torch.Tensor],
         best: dict[str, torch.Tensor] | None, optimizer: Any, scheduler: Any, keep: int,
         rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write a checkpoint atomically and keep only the newest ``keep``. ``rng``: every process's
    :func:`rng_state`, in process order (default: this process's alone)."""
    rng = rng if rng is not None else [rng_state()]
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"step-{loop.step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with write_errors_as_oserror(final):
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
            if best is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, tmp / "best.safetensors")
            opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            for process, (rng_tensors, _) in enumerate(rng):
                save_file(rng_tensors, tmp / _rng_file(process))
            state = {"loop": asdict(loop), "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                     "rng": rng[0][1]}
            if len(rng) > 1:
                state["rng_processes"] = [meta for _, meta in rng[1:]]
            with open(tmp / _DONE, "w", encoding="utf-8") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give back what the half checkpoint took
        raise
    share_modes(tmp)  # safetensors writes 0600
    # The same step written twice (a step checkpoint, then the epoch's at that step): the old one
    # is moved aside, not deleted, until the new one is in place; a kill in between leaves the
    # aside copy, which resume puts back (newest_readable; with keep_checkpoints 1 it is the only one).
    aside = root / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(run_dir: Path, restore: bool = False) -> list[Path]:
    """The complete checkpoints (their done-marker written), newest first. A checkpoint moved
    aside by a save that a kill interrupted (``.step-N.old``, no ``step-N``) counts as step N;
    ``restore`` (only under the training lock: a reader must not undo a save in progress) puts
    it back in place."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = {p.name: p for p in root.glob("step-*") if (p / _DONE).is_file()}
    for aside in root.glob(".step-*.old"):
        name = aside.name[1:-len(".old")]
        if (root / name).is_dir() or not (aside / _DONE).is_file():
            continue
        if restore:
            aside.rename(root / name)
            found[name] = root / name
        else:
            found[name] = aside
    return [found[k] for k in sorted(found, reverse=True)]


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    return next(iter(_complete(run_dir)), None)


def _state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, its ``loop`` made a :class:`LoopState`; a damaged one names itself."""
    try:
        state = json.loads((path / _DONE).read_text(encoding="utf-8"))
        state["loop"] = LoopState(**state["loop"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"checkpoint {_DONE} is damaged ({brief(e, 80)})", where=str(path),
                       fix=f"delete {path} to go back to the checkpoint before it") from None
    return state


def loop_state(path: Path) -> LoopState:
    """Where the loop stood at a checkpoint (state.json alone: no tensor is read)."""
    return _state(path)["loop"]


def readable(path: Path) -> bool:
    """Whether a complete checkpoint's files can still be read (headers only: cheap)."""
    try:
        loop = loop_state(path)
    except RunError:
        return False
    # a file deleted after the checkpoint was written (by hand, a partial copy) makes it as unusable
    # as a truncated one: the best epoch's weights are needed at the end of the run
    needed = ["trainable.safetensors", "optimizer.safetensors"] + (["best.safetensors"] if loop.best_epoch > 0 else [])
    needed += [_rng_file(p) for p in range(loop.processes or 1)]
    if not all((path / name).is_file() for name in needed):
        return False
    return unreadable_safetensors(path.glob("*.safetensors")) is None


def newest_readable(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint that can be read, and the newer ones that cannot (damaged
    after they were written: a truncating copy, a disk error). The damaged ones are renamed
    ``damaged-step-*`` so that a resumed run can write its own checkpoints at those steps."""
    damaged = []
    for p in _complete(run_dir, restore=True):
        if readable(p):
            return p, damaged
        aside = p.with_name(f"damaged-{p.name}")
        shutil.rmtree(aside, ignore_errors=True)
        p.rename(aside)
        damaged.append(aside)
    return None, damaged


@dataclass
class Loaded:
    loop: LoopState
    trainable: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    path: Path


def _read(file: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors; a damaged file (written whole, then truncated by a copy or a full
    disk elsewhere) names itself and the way back: the checkpoint before it."""
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise RunError(f"checkpoint file is damaged ({brief(e, 120)})", where=str(file),
                       fix=f"delete {file.parent} to go back to the checkpoint before it") from None


def load(path: Path) -> Loaded:
    state = _state(path)
    best = _read(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
    loaded = Loaded(state["loop"], _read(path / "trainable.safetensors"), best, path)
    loaded._state = state  # type: ignore[attr-defined]
    return loaded


def restore(loaded: Loaded, optimizer: Any, scheduler: Any, process: int = 0) -> None:
    """Put optimizer, scheduler and every RNG (``process``'s own) back exactly as they were when saved."""
    state = loaded._state  # type: ignore[attr-defined]
    optimizer.load_state_dict(_join_optimizer(_read(loaded.path / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    meta = state["rng"] if process == 0 else state["rng_processes"][process - 1]
    set_rng_state(_read(loaded.path / _rng_file(process)), meta)
