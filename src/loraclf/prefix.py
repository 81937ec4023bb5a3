"""Frozen-prefix caching: run the layers nobody trains once, not once per epoch.

When LoRA adapts only layers k and above (the seed recipe on roberta-base adapts 0,1,5,10,11:
k = 0, nothing to cache; "layers 6-11": k = 6), the embeddings and layers 0..k-1 have no
trainable parameter and get no gradient. Run without dropout they give the same hidden states
every epoch, so they are computed once - the input of layer k for every row - and kept: in RAM
up to a budget, memory-mapped on disk beyond it. From then on the model runs from layer k.

What it changes: the prefix runs as in eval mode (no dropout below layer k; layers k and above,
LoRA and the head keep theirs). Everything else is unchanged, which the tests check: a cached
run equals an uncached run whose prefix is in eval mode.

How: the model's own forward still runs (masks, position handling and heads stay the library's
code); the embeddings return the cached hidden states of the batch and layers 0..k-1 pass them
through. A self-check compares cached and full logits on a few rows before the cache is used,
so an architecture whose forward does more between embeddings and layers is detected, not
silently trained wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .data import PadCollator, sorted_batches
from .model import find_blocks, num_layers
from .precision import autocast
from .runs import write_errors_as_oserror


class _Captured(Exception):
    """Raised by the hook on layer k once its input is captured: the rest of the forward is skipped."""


@dataclass
class PrefixStore:
    """Hidden states entering layer k, row after row without padding.

    data: float32 [sum of row lengths, H] (an np.memmap when over the RAM budget);
    offsets: int64 [N + 1], row i is data[offsets[i]:offsets[i + 1]]."""

    data: np.ndarray
    offsets: np.ndarray
    spill_dir: Path | None = None

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def batch(self, idx: Sequence[int], width: int) -> torch.Tensor:
        """float32 [B, width, H], rows zero-padded on the right (pad positions are masked)."""
        out = torch.zeros((len(idx), width, self.data.shape[1]), dtype=torch.float32)
        for row, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[row, : b - a] = torch.from_numpy(np.asarray(self.data[a:b]))
        return out

    def close(self) -> None:
        """Free the memory map and delete its file."""
        self.data = np.empty((0, self.data.shape[1]), dtype=np.float32)
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks before writing it. The map is a sparse file: on a
    disk that cannot hold it, a write through the map kills the process (SIGBUS), where
    reserving the space first gives an OSError (ENOSPC) that can be reported."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: as before, unreserved
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # (a file system that cannot)
            raise
    finally:
        os.close(fd)


class FrozenPrefix:
    """The untrained bottom of a model: its embeddings and blocks[:k], with k the lowest block
    that holds a trainable parameter. Build with :meth:`find`."""

    #: False keeps the prefix in eval mode but computes it every step: the reference the cache
    #: is tested against (and a way to rule the cache out when debugging).
    skip: bool = True

    def __init__(self, model: torch.nn.Module, embeddings: torch.nn.Module, blocks: torch.nn.ModuleList, k: int):
        self.model = model
        self.embeddings = embeddings
        self.blocks = blocks
        self.k = k
        self._pending: torch.Tensor | None = None
        # what block k-1 returns: a tensor (None), or a tuple of that length (BERT's (hidden,),
        # DeBERTa-v2's (hidden, attentions)); the stand-in blocks return the same shape
        self._tuple_len: int | None = None

    @classmethod
    def find(cls, model: torch.nn.Module) -> FrozenPrefix | None:
        """The frozen prefix of ``model``, or None when there is none (LoRA on layer 0, trainable
        embeddings) or the model is not laid out as ``<base>.embeddings`` + ``<base>.<encoder>.<blocks>``."""
        config = getattr(model, "config", None)
        try:
            blocks_name = find_blocks(model, num_layers(config))
        except Exception:  # noqa: BLE001 - an architecture we cannot split simply gets no cache
            return None
        modules = dict(model.named_modules())
        parts = blocks_name.split(".")
        base = ".".join(parts[:-2])  # "...roberta" of "...roberta.encoder.layer"
        embeddings = modules.get(f"{base}.embeddings" if base else "embeddings")
        if embeddings is None:
            return None
        blocks = modules[blocks_name]
        trainable = [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
        if not trainable or trainable[0] == 0 or any(p.requires_grad for p in embeddings.parameters()):
            return None
        return cls(model, embeddings, blocks, trainable[0])

    def prefix_modules(self) -> list[torch.nn.Module]:
        return [self.embeddings, *self.blocks[: self.k]]

    def eval_prefix(self) -> None:
        """Put the prefix in eval mode (call after ``model.train()``): no dropout below layer k."""
        for m in self.prefix_modules():
            m.eval()

    @torch.no_grad()
    def compute(self, input_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int, device: torch.device,
                precision: str, ram_bytes: int, spill_parent: Path | None = None) -> PrefixStore:
        """Run embeddings + blocks[:k] in eval mode over every row; keep the input of block k.
        Beyond ``ram_bytes`` the store is a memory map in a temporary folder under ``spill_parent``."""
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        hidden_size = int(self.model.config.hidden_size)
        shape = (int(offsets[-1]), hidden_size)
        spill_dir = None
        if shape[0] * hidden_size * 4 > ram_bytes:
            spill_dir = Path(tempfile.mkdtemp(prefix=".prefix-cache-", dir=spill_parent))
            spill = spill_dir / "hidden.npy"
            try:
                with write_errors_as_oserror(spill):  # a full disk or a file size limit: named
                    data: np.ndarray = np.lib.format.open_memmap(spill, mode="w+", dtype=np.float32, shape=shape)
                    _reserve(spill)
            except OSError:
                shutil.rmtree(spill_dir, ignore_errors=True)  # and nothing left behind
                raise
        else:
            data = np.empty(shape, dtype=np.float32)
        captured: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Captured

        def note_output(module, args, output):
            self._tuple_len = len(output) if isinstance(output, tuple) else None

        was_training = self.model.training
        self.model.eval()
        collate = PadCollator(pad_id)
        hooks = [self.blocks[self.k].register_forward_pre_hook(grab, with_kwargs=True),
                 self.blocks[self.k - 1].register_forward_hook(note_output)]
        try:
            for idx in sorted_batches(lengths, batch_size):
                batch = collate([(input_ids[i], -1) for i in idx])
                captured.clear()
                with autocast(device, precision):
                    try:
                        self.model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device))
                    except _Captured:
                        pass
                h = captured[0].float().cpu().numpy()
                for row, i in enumerate(idx):
                    data[offsets[i] : offsets[i + 1]] = h[row, : lengths[i]]
        except BaseException:
            # an error or a second Ctrl-C mid-pass: the spill file (the size of the dataset's
            # hidden states) must not stay behind in the run folder
            del data
            if spill_dir is not None:
                shutil.rmtree(spill_dir, ignore_errors=True)
            raise
        finally:
            for hook in hooks:
                hook.remove()
            self.model.train(was_training)
        if spill_dir is not None:
            data.flush()  # type: ignore[attr-defined]
        return PrefixStore(data, offsets, spill_dir)

    def feed(self, hidden: torch.Tensor) -> None:
        """The cached hidden states [B, T, H] of the next batch, on the model's device."""
        self._pending = hidden

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within: forwards start at layer k from what :meth:`feed` gave (one feed per forward)."""

        def embeddings_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            if self._pending is None:
                raise RuntimeError("frozen-prefix cache: forward without cached hidden states")
            hidden, self._pending = self._pending, None
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and tuple(hidden.shape[:2]) != tuple(ids.shape):
                raise RuntimeError(f"frozen-prefix cache: hidden states {tuple(hidden.shape)} do not match "
                                   f"input_ids {tuple(ids.shape)}")
            return hidden

        def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._tuple_len is None:
                return hidden_states
            return (hidden_states,) + (None,) * (self._tuple_len - 1)  # attentions not asked for

        patched = self.prefix_modules()
        self.embeddings.forward = embeddings_forward  # type: ignore[method-assign]
        for block in self.blocks[: self.k]:
            block.forward = passthrough  # type: ignore[method-assign]
        try:
            yield
        finally:
            for m in patched:
                del m.forward  # back to the class's forward
            self._pending = None

    @torch.no_grad()
    def agrees(self, input_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device, precision: str,
               rows: int = 8) -> bool:
        """Self-check on ``rows`` rows, eval mode: logits with the cache equal the full forward's
        (to float tolerance). False for architectures whose forward does more than
        embeddings -> blocks, where the cache would be wrong."""
        ids = list(input_ids[:rows])
        if not ids:
            return True
        store = self.compute(ids, pad_id, len(ids), device, precision, ram_bytes=1 << 62)
        collate = PadCollator(pad_id)
        order = sorted_batches([len(x) for x in ids], len(ids))[0]
        batch = collate([(ids[i], -1) for i in order])
        was_training = self.model.training
        self.model.eval()
        try:
            kw = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
            with autocast(device, precision):
                full = self.model(**kw).logits.float()
                with self.active():
                    self.feed(store.batch(order, batch["input_ids"].shape[1]).to(device))
                    try:
                        cached = self.model(**kw).logits.float()
                    except Exception:  # noqa: BLE001 - e.g. ELECTRA-small projects the embeddings
                        # before layer 0, Longformer pads the ids: the cache does not fit this
                        # forward, which is what the check is for
                        return False
        finally:
            self.model.train(was_training)
        tol = 1e-2 if precision == "bf16" else 1e-4
        return bool(torch.allclose(full, cached, atol=tol, rtol=tol))


class PrefixCollator(PadCollator):
    """Pads a batch of (ids, label, row index) and adds ``hidden`` float32 [B, T, H] from the store."""

    def __init__(self, pad_id: int, store: PrefixStore, multiple: int | None = None, max_width: int | None = None):
        super().__init__(pad_id, multiple, max_width)
        self.store = store

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
        batch = super().__call__(items)
        batch["hidden"] = self.store.batch([it[2] for it in items], batch["input_ids"].shape[1])
        return batch
