"""The training loop (accelerate): everything validated first, then weights loaded, then
AdamW on the trainable parameters only, per-epoch validation, the best epoch's adapter kept.

Order matters for the user: config, data rows and the parameter budget are all checked
before any weight is loaded or any file is written, so a mistake costs seconds and leaves
nothing behind that looks like a run.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from transformers import get_scheduler

from . import budget, checkpoint, distributed, plots, runs
from .config import COMPILE_MODES_WITH_GRAPHS, Config, TrainConfig, save_config
from .data import (IndexedDataset, LengthGroupedBatchSampler, PadCollator, Splits, TokenizedDataset, cache_root,
                   is_hub_name, load_splits, same_data, tokenize_cached)
from .errors import ConfigError, DataError, LoraclfError, ModelError, RunError, TrainingError
from .evaluate import logits_metrics
from .graphs import PAD_MULTIPLE, StepGraphs
from .model import (base_fingerprint, build_model, check_base, check_weights, compile_in_place, hub_commit,
                    load_model_config, load_tokenizer, load_trained, resolve_name, trainable_state_dict, usable_length)
from .precision import autocast, cast_frozen_matmul_weights, choose_precision
from .predict import logits_for
from .prefix import FrozenPrefix, PrefixCollator, PrefixStore


# what a training step reads from a collated batch (n_tokens is host-side bookkeeping)
STEP_INPUTS = ("input_ids", "attention_mask", "labels", "hidden")


class Callback(Protocol):
    """How the loop reports progress; the CLI draws a progress bar, tests record events."""

    def on_start(self, total_steps: int, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, record: dict[str, Any]) -> None: ...
    def on_eval(self, record: dict[str, Any]) -> None: ...


class Interrupted(LoraclfError):
    """Training stopped on request (SIGINT/SIGTERM) after writing a checkpoint."""

    exit_code = 130


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
    """metrics.jsonl: appended and flushed per record, so a crash keeps what was measured.
    ``write``: false in the other processes of a multi-process run, which keep records in memory
    only (of this session: a resumed run's earlier records are the main process's to read)."""

    def __init__(self, path: Path, write: bool = True):
        self.path = path
        self.write = write
        self.records: list[dict[str, Any]] = []

    def truncate(self, n: int) -> int:
        """Keep the first ``n`` records (those a checkpoint knows about); drop the rest. Returns how
        many of those ``n`` are missing or unreadable (a file damaged or cut short since): the
        run goes on without them, and says so."""
        if not self.write:
            return 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()[:n] if self.path.exists() else []
        self.records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                self.records.append(json.loads(line))
        # replaced whole: a kill or a full disk mid-write leaves the old file, not half of one
        runs.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        return n - len(self.records)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.write:
            return
        with runs.write_errors_as_oserror(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _evaluate(model, ids, labels, names, cfg: Config, accelerator: Accelerator, precision: str,
              prefix: tuple[FrozenPrefix, PrefixStore] | None = None) -> dict[str, Any]:
    model = accelerator.unwrap_model(model)
    logits = logits_for(model, ids, cfg_pad_id(model), cfg.train.eval_batch_size, accelerator.device, precision,
                        prefix)
    return logits_metrics(logits, labels, names)


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


def _cuda_graphs_unsupported() -> str | None:
    """Why this process cannot train with CUDA graphs, or None. (Multi-GPU would need the
    gradient all-reduce inside the graph, which DDP does not do as captured here.)"""
    state = distributed.state()
    if state.device.type != "cuda" or state.num_processes > 1:
        return f"needs one CUDA GPU; this run would train on {state.device} in {state.num_processes} process(es)"
    return None


def fuse_accumulation(tc: TrainConfig) -> bool:
    """Whether a new run fuses its accumulation micro-batches (train.fuse_accumulation resolved).

    Equal-sized micro-batches each averaged, then averaged again, give the mean over all their
    rows: one batch of batch_size x steps rows computes the same loss and gradient. Fewer, larger
    kernels pay on a GPU; on a CPU the larger batch's padding costs more than it saves."""
    if tc.fuse_accumulation is not None:
        return tc.fuse_accumulation
    return tc.cuda_graphs is True or distributed.state().device.type == "cuda"


def prepare(cfg: Config, label_names: list[str] | None = None) -> tuple[Splits, Any, Any, budget.Breakdown]:
    """All checks that need no weights: data rows, tokenizer, architecture, budget."""
    splits = load_splits(cfg.data, label_names)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model_config = load_model_config(cfg.model, splits.label_names)
    if model_config.pad_token_id is None:
        model_config.pad_token_id = tokenizer.pad_token_id
    check_weights(cfg.model, model_config)
    meta_model = build_model(cfg.model, cfg.lora, model_config, meta=True)
    counts = budget.breakdown(meta_model)
    budget.check(counts, cfg.train.max_trainable_params)
    if cfg.train.cuda_graphs is True and (problem := _cuda_graphs_unsupported()):
        raise ConfigError([problem], where="train.cuda_graphs", fix="set it to false")
    if cfg.train.cache_frozen_prefix and FrozenPrefix.find(meta_model) is None:
        raise ConfigError(["train.cache_frozen_prefix is true but there is no frozen prefix to cache: LoRA adapts "
                           "layer 0, or the model is not laid out as embeddings followed by layers"],
                          where="train.cache_frozen_prefix", fix="set it to null (on where it applies) or false")
    return splits, tokenizer, model_config, counts


def _frozen_prefix(model: torch.nn.Module, tc: TrainConfig, train_ids: list[list[int]], val_ids: list[list[int]],
                   pad_id: int, device: torch.device, precision: str, run_dir: Path,
                   ) -> tuple[FrozenPrefix | None, PrefixStore | None, PrefixStore | None]:
    """The frozen prefix and its cached hidden states for the training and validation rows
    (None where caching is off, does not apply, or fails its self-check)."""
    if tc.cache_frozen_prefix is False:
        return None, None, None
    prefix = FrozenPrefix.find(model)
    if prefix is None or not prefix.skip:
        return prefix, None, None
    if not prefix.agrees(val_ids or train_ids, pad_id, device, precision):
        if tc.cache_frozen_prefix:
            raise ConfigError(["train.cache_frozen_prefix: logits with the cache differ from the full model's on "
                               "this architecture"], where="train.cache_frozen_prefix", fix="set it to false")
        return None, None, None
    ram = tc.prefix_cache_ram_mb * 2**20
    train_store = prefix.compute(train_ids, pad_id, tc.eval_batch_size, device, precision, ram, run_dir)
    try:
        in_ram = train_store.nbytes if train_store.spill_dir is None else 0  # a memory map takes no RAM budget
        val_store = prefix.compute(val_ids, pad_id, tc.eval_batch_size, device, precision,
                                   max(0, ram - in_ram), run_dir)
    except BaseException:
        train_store.close()  # the caller only closes stores it was given
        raise
    return prefix, train_store, val_store


def _new_run(cfg: Config, splits: Splits, tokenizer: Any, counts: budget.Breakdown) -> tuple[Config, dict[str, Any]]:
    """Fill the (new, empty) run directory with what identifies the run; status stays "running"."""
    run_dir = Path(cfg.train.output_dir)
    # Record the base and the data files as absolute paths when local, so that evaluate, report
    # and --resume work from any directory, and after the run folder moves.
    resolved = cfg.model_copy(deep=True)
    resolved.model.name_or_path = resolve_name(cfg.model.name_or_path)
    for role, path in _local_data(cfg).items():
        setattr(resolved.data, role, str(path.resolve()))
    save_config(resolved, run_dir / runs.CONFIG_FILE)
    runs.write_json(run_dir / runs.LABELS_FILE, splits.label_names)
    info: dict[str, Any] = {
        "status": "running",
        "base_model": resolved.model.name_or_path,
        "label_names": splits.label_names,
        "int_labels": splits.int_labels,
        "seed": cfg.train.seed,
        "data": splits.fingerprints,
        # a local base folder's files (a hub base is pinned by its commit in config.yaml instead)
        **({"base_model_files": files} if (files := base_fingerprint(resolved.model)) else {}),
        "rows": {"train": len(splits.train), "validation": len(splits.validation),
                 "test": len(splits.test) if splits.test is not None else 0},
        "params": counts.to_dict(),
        "versions": runs.environment(),
        "recipe": runs.recipe(resolved),
    }
    runs.write_json(run_dir / runs.RUN_FILE, info)
    with runs.write_errors_as_oserror(run_dir / runs.TOKENIZER_DIR):
        tokenizer.save_pretrained(run_dir / runs.TOKENIZER_DIR)
    return resolved, info


def _local_data(cfg: Config) -> dict[str, Path]:
    """The run's local data files by role (train, validation, test); hub datasets are none."""
    sources = {role: getattr(cfg.data, role) for role in ("train", "validation", "test")}
    return {role: Path(s).expanduser() for role, s in sources.items() if s is not None and not is_hub_name(s)}


def _local_inputs(cfg: Config) -> list[Path]:
    """The local base model folder and data files a run reads (hub names are none)."""
    paths = [Path(cfg.model.name_or_path).expanduser(), *_local_data(cfg).values()]
    return [p for p in paths if p.exists()]


def _undo_new_run(run_dir: Path) -> None:
    """What :func:`_new_run` wrote, removed after it failed (a full disk): no run.json left saying
    "running" for a run that never started, and the folder can be trained into again as it is."""
    for name in (runs.RUN_FILE, runs.CONFIG_FILE, runs.LABELS_FILE):
        with contextlib.suppress(OSError):
            (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / runs.TOKENIZER_DIR, ignore_errors=True)


@contextlib.contextmanager
def _callers_generators() -> Iterator[None]:
    """The caller's random generators (python, NumPy, torch), given back as they were: training
    seeds them (set_seed) and draws from them, and a notebook's next cell expects its own."""
    taken = checkpoint.rng_state()
    try:
        yield
    finally:
        checkpoint.set_rng_state(*taken)


def train(cfg: Config, callback: Callback | None = None, stop: threading.Event | None = None) -> TrainResult:
    """Train a new run. ``stop``: when set (e.g. by a signal handler), the loop writes a
    checkpoint at the next optimizer step and raises :class:`Interrupted`."""
    if not isinstance(cfg, Config):  # a path passed where the loaded config belongs failed as an AttributeError
        raise TypeError(f"train() takes a loraclf.config.Config, not {type(cfg).__name__}: "
                        "load it first, train(load_config('recipe.yaml'))")
    t_start = time.perf_counter()
    run_dir = Path(cfg.train.output_dir)
    prepared: list[tuple[Splits, Any, Any, budget.Breakdown]] = []  # the main process's, not sent to the others
    with _callers_generators(), contextlib.ExitStack() as held:  # held: the main process's training lock

        def new_run() -> tuple[Config, dict[str, Any]]:
            pinned = cfg
            # A hub base is pinned to the commit its name resolves to now, before anything is loaded:
            # the tokenizer, config and weights all come from that commit, and the run records it
            # ("main" moves on, the adapter does not).
            if (commit := hub_commit(cfg.model)) is not None:
                pinned = cfg.model_copy(deep=True)
                pinned.model.revision = commit
            prepared.append(prepare(pinned))
            splits, tokenizer, _, counts = prepared[0]
            runs.prepare_dir(run_dir, cfg.train.overwrite, inputs=_local_inputs(cfg))
            # Locked before run.json exists: a refused lock leaves no run that claims to be "running".
            held.enter_context(runs.training_lock(run_dir))
            try:
                return _new_run(pinned, splits, tokenizer, counts)
            except BaseException:
                _undo_new_run(run_dir)
                raise

        # The main process checks and sets up alone, so that a mistake is reported once; the others
        # then load the same data and the same commit of the base.
        resolved, info = distributed.on_main(new_run)
        splits, tokenizer, model_config, counts = prepared[0] if prepared else prepare(resolved)
        try:
            return _fit(resolved, splits, tokenizer, model_config, counts, info, callback, stop, None, t_start)
        except (ConfigError, DataError, ModelError):
            # a mistake only found once training set up (a token budget below the longest row, bf16 on
            # a device without it) before anything trained: the folder goes back to as it was found,
            # so that the corrected command runs without --train.overwrite
            if distributed.state().is_main_process and checkpoint.latest(run_dir) is None:
                _undo_new_run(run_dir)
            raise


def resume(run_dir: str | Path, callback: Callback | None = None, stop: threading.Event | None = None) -> TrainResult:
    """Continue an interrupted run from its newest checkpoint, exactly where it stopped."""
    t_start = time.perf_counter()
    path = runs.open_run(run_dir, allow_incomplete=True).path
    prepared: list[tuple[Splits, Any, Any, budget.Breakdown]] = []  # the main process's, not sent to the others
    with _callers_generators(), contextlib.ExitStack() as held:  # held: the main process's training lock

        def reopen() -> tuple[Config, dict[str, Any], Path, list[str]]:
            held.enter_context(runs.training_lock(path))
            run = runs.open_run(path, allow_incomplete=True)  # read under the lock: another process may just have finished it
            if run.info.get("status") == "complete":
                raise RunError("run is already complete", where=str(run.path), fix="nothing to resume; train a new run")
            cfg, info, ckpt, checked = _reopen(run)
            prepared.append(checked)
            return cfg, info, ckpt, run.label_names

        cfg, info, ckpt, label_names = distributed.on_main(reopen)
        splits, tokenizer, model_config, counts = prepared[0] if prepared else prepare(cfg, label_names)
        return _fit(cfg, splits, tokenizer, model_config, counts, info, callback, stop, ckpt, t_start)


def _reopen(run: runs.Run) -> tuple[Config, dict[str, Any], Path, tuple[Splits, Any, Any, budget.Breakdown]]:
    """Checks that a run can go on from its newest checkpoint, and marks it running again (the
    main process only: it renames damaged checkpoints and writes run.json)."""
    ckpt, damaged = checkpoint.newest_readable(run.path)
    if ckpt is None:
        raise RunError("run has no readable checkpoint to resume from" + (
                       f" ({len(damaged)} damaged, renamed damaged-step-*)" if damaged else ""), where=str(run.path),
                       fix="train it again (add --train.overwrite true to reuse the directory)")
    try:
        splits, tokenizer, model_config, counts = prepare(run.cfg, run.label_names)
    except DataError as e:
        if e.what == "file not found":  # the fix named --data.train, which resume refuses
            e.fix = (f"restore the file there, or set its new path in {run.path / runs.CONFIG_FILE} "
                     "(the content is checked against the run's fingerprint)")
            e.args = (e.message,)
        raise
    if not same_data(splits.fingerprints, run.info.get("data")):
        raise RunError("the data differs from the data the run started with (fingerprints do not match)",
                       where=str(run.path), fix="restore the original data files, or train a new run")
    check_base(run.cfg.model, run.info.get("base_model_files"), run.path)
    trained_in, now = checkpoint.loop_state(ckpt).processes or 1, distributed.state().num_processes
    if trained_in != now:
        # each process's share of the batches, and so where the run stands, depends on how many there are
        raise RunError(f"the run trained in {trained_in} process(es) so far; this resume has {now}",
                       where=str(run.path), fix=f"resume it with {trained_in} process(es) "
                                                f"(accelerate launch --num_processes {trained_in})")
    info = {k: v for k, v in run.info.items() if k != "error"}
    info["status"] = "running"
    env = runs.environment()
    if env != info.get("versions") and env not in info.get("resumed_with_versions", []):
        # resumed under other releases (or on another platform): the record of what trained the run says so
        info["resumed_with_versions"] = [*info.get("resumed_with_versions", []), env]
    if damaged:  # resumed from an older checkpoint; run.json says so (the steps after it are redone)
        info["resumed_past_damaged"] = [p.name for p in damaged]
    runs.write_json(run.path / runs.RUN_FILE, info)
    # the run lives where it is now: a moved or copied run, or one whose output_dir was relative
    # to another working directory, must not continue in the folder its config names
    cfg = run.cfg.model_copy(deep=True)
    cfg.train.output_dir = str(run.path)
    return cfg, info, ckpt, (splits, tokenizer, model_config, counts)


_ACCELERATE_SINGLETONS = (AcceleratorState, GradientState)


def _set_aside_accelerate_state() -> list[dict[str, Any]]:
    """Clear accelerate's process-wide state and return what it held. An Accelerator made earlier
    in this process (a notebook's ``Trainer(bf16=True)``) would otherwise impose its settings on
    training's: bf16 autocast wrapped around the forward of a run that records fp32. Precision
    is loraclf's own (``autocast``), so training's Accelerator starts afresh without mixed
    precision; :func:`_restore_accelerate_state` gives the caller's objects their state back."""
    saved = [dict(cls._shared_state) for cls in _ACCELERATE_SINGLETONS]
    for cls in _ACCELERATE_SINGLETONS:
        cls._shared_state.clear()
    return saved


def _restore_accelerate_state(saved: list[dict[str, Any]]) -> None:
    for cls, state in zip(_ACCELERATE_SINGLETONS, saved):
        cls._shared_state.clear()
        cls._shared_state.update(state)


def _fit(cfg: Config, splits: Splits, tokenizer: Any, model_config: Any, counts: budget.Breakdown,
         info: dict[str, Any], callback: Callback | None, stop: threading.Event | None,
         ckpt: Path | None, t_start: float) -> TrainResult:
    cb = callback or _Silent()
    stop = stop or threading.Event()
    tc = cfg.train
    run_dir = Path(tc.output_dir)
    # wall time of the sessions before this one (a resumed run), read once: the run's record is
    # this plus this session's, also when the run fails after recording it
    wall_before = info.get("wall_time_s", 0.0)
    procs = distributed.state()
    main = procs.is_main_process
    callers_accelerate = None
    if main:
        for stale in run_dir.glob(".prefix-cache-*"):
            # the disk cache of a session that was killed (an OOM kill leaves no chance to clean up);
            # the training lock says no other process is using it
            shutil.rmtree(stale, ignore_errors=True)
    try:
        procs.wait_for_everyone()  # before any process makes a cache of its own there
        loaded = checkpoint.load(ckpt) if ckpt is not None else None
        fuse = loaded.loop.fused if loaded is not None and loaded.loop.fused is not None else fuse_accumulation(tc)
        accumulation = 1 if fuse else tc.gradient_accumulation_steps
        # The sampler groups rows per optimizer step, then splits a group into micro-batches unless
        # fused. A checkpoint written before that grouped each micro-batch on its own: its epoch
        # goes on in its own order, or rows would be seen twice and others not at all.
        step_groups = loaded is None or loaded.loop.step_groups is not None
        if step_groups:
            sampling = {"batch_size": tc.batch_size, "max_tokens": tc.max_tokens_per_batch,
                        "accumulate": tc.gradient_accumulation_steps, "split": not fuse}
        else:
            # a token budget is per micro-batch: a fused step held gradient_accumulation_steps of them
            # (not for a checkpoint written before fusing was recorded: it cut its batches with one budget)
            scaled = fuse and tc.max_tokens_per_batch and loaded.loop.fused is not None
            sampling = {"batch_size": tc.batch_size * (tc.gradient_accumulation_steps if fuse else 1),
                        "max_tokens": tc.max_tokens_per_batch * (tc.gradient_accumulation_steps if scaled else 1)
                        if tc.max_tokens_per_batch else None}
        use_graphs = tc.cuda_graphs if tc.cuda_graphs is not None else (
            _cuda_graphs_unsupported() is None and accumulation == 1
            and not (tc.compile and tc.compile_mode in COMPILE_MODES_WITH_GRAPHS))
        # non_blocking + pinned memory: batch copies overlap the previous step's kernels on a GPU
        # even_batches off: the sampler evens the batches out itself (LengthGroupedBatchSampler)
        callers_accelerate = _set_aside_accelerate_state()
        accelerator = Accelerator(mixed_precision="no", gradient_accumulation_steps=accumulation,
                                  dataloader_config=DataLoaderConfiguration(non_blocking=True, even_batches=False))
        on_cuda = accelerator.device.type == "cuda"
        if loaded is not None and loaded.loop.precision is not None:
            # the precision the run trained in so far, as for fused above: "auto" may resolve
            # otherwise on this device, and a run half bf16, half fp32 is neither run
            try:
                precision = choose_precision(loaded.loop.precision, accelerator.device)
            except ConfigError:
                raise RunError(f"the run trained in {loaded.loop.precision} so far, which {accelerator.device} cannot "
                               "run", where=str(run_dir), fix="resume it on a device that runs bf16") from None
        else:
            precision = choose_precision(tc.precision, accelerator.device)
        cache_dir = cache_root() if cfg.data.token_cache else None
        max_length = usable_length(cfg.data.max_length, model_config)
        train_ids = tokenize_cached(splits.train.texts, tokenizer, max_length, cache_dir)
        val_ids = tokenize_cached(splits.validation.texts, tokenizer, max_length, cache_dir)
        # a CUDA graph per batch shape: round lengths so that few shapes occur
        pad_multiple = cfg.data.pad_to_multiple_of or (PAD_MULTIPLE if use_graphs else None)
        if tc.max_tokens_per_batch:
            # the longest row would go alone, over the budget: a budget that cannot hold the data is a mistake
            widest = PadCollator(tokenizer.pad_token_id, pad_multiple, max_length).width(max(map(len, train_ids)))
            if widest > tc.max_tokens_per_batch:
                raise ConfigError([f"{tc.max_tokens_per_batch} is below the longest training row ({widest} tokens, "
                                   "padded)"], where="train.max_tokens_per_batch",
                                  fix=f"set it to at least {widest}, or lower data.max_length")
        set_seed(tc.seed)  # before the model: the head and LoRA A matrices are initialised randomly
        model = build_model(cfg.model, cfg.lora, model_config)
        if precision == "bf16":
            cast_frozen_matmul_weights(model)
        if tc.compile:
            compile_in_place(model, tc.compile_mode)
        # CUDA graph trees must be told where a training step begins: graph outputs of one step are
        # overwritten by the next
        cudagraphs = on_cuda and tc.compile and tc.compile_mode == "reduce-overhead"

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, cfg.train, fused=accelerator.device.type == "cuda")
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped = accelerator.unwrap_model(model)

        t_cache = time.perf_counter()
        prefix, train_store, val_store = _frozen_prefix(unwrapped, tc, train_ids, val_ids, tokenizer.pad_token_id,
                                                        accelerator.device, precision, run_dir)
        stores = [s for s in (train_store, val_store) if s is not None]
        cache_seconds = time.perf_counter() - t_cache
        if train_store is not None:
            dataset = IndexedDataset(train_ids, splits.train.labels)
            collate: PadCollator = PrefixCollator(tokenizer.pad_token_id, train_store, pad_multiple, max_length)
        else:
            dataset = TokenizedDataset(train_ids, splits.train.labels)
            collate = PadCollator(tokenizer.pad_token_id, pad_multiple, max_length)
        # the token budget counts the batch as padded (rounded up to pad_multiple), not its rows' lengths
        sampler = LengthGroupedBatchSampler([len(x) for x in train_ids], seed=tc.seed, group_by_length=tc.group_by_length,
                                            width=collate.width, processes=procs.num_processes, **sampling)
        # A private generator: every DataLoader iteration draws a seed from its generator, which
        # would otherwise advance the global RNG that dropout uses and break exact resumption.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, pin_memory=on_cuda,
                                             generator=torch.Generator().manual_seed(tc.seed))
        loader = accelerator.prepare(loader)

        def local_batches(epoch: int) -> int:
            """This process's micro-batches in ``epoch``: accelerate deals the epoch's batches out in
            turn, and the sampler made them a multiple of the processes."""
            return sampler.batches_in_epoch(epoch) // procs.num_processes

        total_steps = sum(math.ceil(local_batches(e) / accumulation) for e in range(1, tc.epochs + 1))
        scheduler = get_scheduler("constant_with_warmup" if tc.scheduler == "constant" else tc.scheduler, optimizer,
                                  num_warmup_steps=math.ceil(tc.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)

        def forward_backward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            """Loss and gradients of one micro-batch (clipped when the optimizer steps next);
            returns the detached float32 loss. No host synchronisation: CUDA graphs capture it."""
            if "hidden" in inputs:
                prefix.feed(inputs["hidden"])
            with autocast(accelerator.device, precision):
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                loss = training_loss(out.logits, inputs["labels"], tc.label_smoothing)
            # accelerate divides every micro-batch's loss by gradient_accumulation_steps; an epoch's
            # last step may have fewer micro-batches, whose mean is then over those it has (as a
            # fused step's is): without this its gradient would be scaled down
            accelerator.backward(loss * group_scale if group_scale != 1.0 else loss)
            if (step_graphs is not None or accelerator.sync_gradients) and tc.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, tc.max_grad_norm)
            return loss.detach().float()

        # null (auto) falls back to eager when a capture fails; true insists
        step_graphs = StepGraphs(forward_backward, params, strict=tc.cuda_graphs is True,
                                 device=accelerator.device) if use_graphs else None
        metrics = _Metrics(run_dir / runs.METRICS_FILE, write=main)
        loop = checkpoint.LoopState(fused=fuse, precision=precision, processes=procs.num_processes, step_groups=True)
        best_state = None
        group_scale = 1.0
        if loaded is not None:
            load_trained(unwrapped, loaded.trainable, run_dir)
            checkpoint.restore(loaded, optimizer, scheduler, procs.process_index)
            loop, best_state = loaded.loop, loaded.best
            loop.fused, loop.precision, loop.processes = fuse, precision, procs.num_processes
            lost = metrics.truncate(loop.metrics_lines)  # records written after the checkpoint are redone
            if lost:
                info["metrics_records_lost"] = info.get("metrics_records_lost", 0) + lost
        loop.train_time += cache_seconds  # the cache is part of what training costs
        cache_seconds_left = cache_seconds
        cb.on_start(total_steps, {"device": str(accelerator.device), "precision": precision,
                                  "frozen_prefix_layers": prefix.k if train_store is not None else 0,
                                  "cuda_graphs": use_graphs,
                                  "trainable": counts.trainable, "train_rows": len(splits.train),
                                  "resumed_at_step": loop.step if ckpt is not None else None})

        # The per-batch losses stay on the device and are summed there; the host reads them (one
        # synchronisation) only at log steps, checkpoints and epoch ends. Reading every step would
        # stop the host from queuing the next step while the device runs this one.
        # float64: a checkpoint's extra flush splits a window in two, and two float32 partial sums
        # would log a resumed run's loss differently from the uninterrupted run's in the last digits
        # examples and tokens: this process's, summed over the processes with the loss
        pending = {"loss": torch.zeros((), device=accelerator.device,
                                     dtype=torch.float32 if accelerator.device.type == "mps" else torch.float64),
                   "n": 0, "since": loop.step, "examples": 0, "tokens": 0}

        def flush_losses() -> None:
            """Called at the same steps in every process (a collective in a multi-process run)."""
            if pending["n"] == 0:
                return
            if procs.num_processes == 1:
                total, examples, tokens = pending["loss"].item(), pending["examples"], pending["tokens"]
            else:
                counts_ = pending["loss"].new_tensor([pending["examples"], pending["tokens"]])
                total, examples, tokens = distributed.sum_over_processes(
                    torch.cat([pending["loss"].reshape(1), counts_])).tolist()
            if not math.isfinite(total):
                last = checkpoint.latest(run_dir)
                steps = (f"at step {loop.step}" if loop.step - pending["since"] <= 1
                         else f"between steps {pending['since'] + 1} and {loop.step}")
                raise TrainingError(
                    f"loss became {total} {steps} (epoch {loop.epoch}); training stopped, "
                    f"last good checkpoint: {last if last else 'none yet'}", where=str(run_dir),
                    fix="lower --train.learning_rate or use --train.precision fp32, then train again")
            loop.window_loss += total
            loop.window_n += pending["n"] * procs.num_processes
            loop.examples_seen += int(examples)
            loop.tokens_seen += int(tokens)
            pending["loss"].zero_()
            pending.update(n=0, since=loop.step, examples=0, tokens=0)

        def save_checkpoint() -> Path | None:
            """Written by the main process (None elsewhere), with every process's generator states."""
            flush_losses()  # a non-finite loss since the last check must not reach a checkpoint
            loop.metrics_lines = len(metrics.records)
            rng = distributed.gather(checkpoint.rng_state())
            if not main:
                return None
            return checkpoint.save(run_dir, loop, trainable_state_dict(unwrapped), best_state, optimizer, scheduler,
                                   keep=tc.keep_checkpoints, rng=rng)

        for epoch in range(loop.epoch, tc.epochs + 1):
            if loop.stopped_early is not None:
                break
            loop.epoch = epoch
            model.train()
            if prefix is not None:
                prefix.eval_prefix()
            # ``batch`` counts this process's micro-batches; the sampler skips those of all processes
            sampler.begin_epoch(epoch, skip=loop.batch * procs.num_processes)
            n_batches = local_batches(epoch)
            last_group = n_batches - (n_batches % accumulation or accumulation)  # first micro-batch of the last step
            t0 = time.perf_counter()
            epoch_t0, cache_seconds_left = loop.train_time - cache_seconds_left, 0.0  # epoch 1 pays for the cache
            # A run resumed from its last checkpoint of an epoch has no batch left in it: accelerate
            # before 1.9 yields None from an empty loader instead of stopping, so do not iterate it
            remaining = loader if loop.batch < n_batches else ()
            with prefix.active() if prefix is not None and train_store is not None else contextlib.nullcontext():
                for batch in remaining:
                    inputs = {k: batch[k] for k in STEP_INPUTS if k in batch}
                    if step_graphs is not None:
                        pending["loss"] += step_graphs(inputs)  # zeroes the gradients first
                        optimizer.step()
                        synced = True
                    else:
                        if cudagraphs:
                            torch.compiler.cudagraph_mark_step_begin()
                        group_scale = accumulation / (n_batches - last_group) if loop.batch >= last_group else 1.0
                        with accelerator.accumulate(model):
                            pending["loss"] += forward_backward(inputs)
                            optimizer.step()
                            optimizer.zero_grad()
                        synced = accelerator.sync_gradients
                    pending["n"] += 1
                    loop.batch += 1
                    pending["examples"] += batch["input_ids"].shape[0]
                    pending["tokens"] += batch["n_tokens"]
                    if not synced:
                        continue
                    scheduler.step()
                    loop.step += 1
                    if loop.step % tc.log_every_steps == 0 or loop.step == total_steps:
                        flush_losses()
                        elapsed = loop.train_time + time.perf_counter() - t0
                        record = {"event": "train", "split": "train", "epoch": epoch, "step": loop.step,
                                  "loss": loop.window_loss / loop.window_n, "lr": scheduler.get_last_lr()[0],
                                  "examples_per_s": loop.examples_seen / elapsed}
                        metrics.add(record)
                        loop.window_loss, loop.window_n = 0.0, 0
                        cb.on_step(loop.step, record)
                    else:
                        cb.on_step(loop.step, {})
                    every = tc.checkpoint_every_steps
                    # several processes must agree to stop at the same step, and at once: a launcher
                    # kills them soon after passing a signal on (torchrun: 30 s)
                    stopping = distributed.any_process(stop.is_set())
                    if stopping or (every and loop.step % every == 0):
                        now = time.perf_counter()
                        loop.train_time += now - t0
                        t0 = now
                        path = save_checkpoint()
                        if stopping:
                            raise Interrupted(f"interrupted at step {loop.step}; checkpoint written to "
                                              f"{path or 'the run folder, by the main process'}",
                                              where=str(run_dir), fix=f"resume with: loraclf train --resume {run_dir}")
            flush_losses()
            loop.train_time += time.perf_counter() - t0

            t_eval = time.perf_counter()
            # evaluated once, by the main process: every process then takes the same best-epoch and
            # early-stopping branch, which separately computed floats need not guarantee
            val = distributed.on_main(lambda: _evaluate(
                model, val_ids, splits.validation.labels, splits.label_names, cfg, accelerator, precision,
                (prefix, val_store) if val_store is not None else None))
            record = {"event": "eval", "split": "validation", "epoch": epoch, "step": loop.step,
                      **{k: val[k] for k in ("loss", "accuracy", "macro_f1", "n")},
                      "train_seconds": round(loop.train_time - epoch_t0, 3),
                      "eval_seconds": round(time.perf_counter() - t_eval, 3)}
            metrics.add(record)
            cb.on_eval(record)
            if val["accuracy"] > loop.best_acc:
                loop.best_acc, loop.best_epoch = val["accuracy"], epoch
                loop.best_val = {k: val[k] for k in ("accuracy", "macro_f1", "loss", "n")}
                best_state = trainable_state_dict(unwrapped)
            elif tc.early_stopping_patience is not None and epoch - loop.best_epoch >= tc.early_stopping_patience:
                loop.stopped_early = epoch  # no better validation accuracy for `patience` epochs
            loop.epoch, loop.batch = epoch + 1, 0
            save_checkpoint()
            if distributed.any_process(stop.is_set()):
                raise Interrupted(f"interrupted after epoch {epoch}; checkpoint written", where=str(run_dir),
                                  fix=f"resume with: loraclf train --resume {run_dir}")

        # Test metrics come from the best epoch's weights, chosen on validation only.
        unwrapped.load_state_dict(best_state, strict=False)
        if accelerator.is_main_process:
            tmp = run_dir / f".{runs.ADAPTER_DIR}.tmp"
            with runs.write_errors_as_oserror(tmp):
                # loraclf never resizes the vocabulary, so the frozen embeddings are the base's own:
                # PEFT's "auto" would look the base config up on the Hub (at main, not the run's
                # revision) to find that out, warning when offline
                unwrapped.save_pretrained(tmp, save_embedding_layers=False)
            runs.share_modes(tmp)  # safetensors writes 0600
            runs.replace_dir(tmp, run_dir / runs.ADAPTER_DIR)
        test = None
        if splits.test is not None:
            test_ids = tokenize_cached(splits.test.texts, tokenizer, max_length, cache_dir)
            test = distributed.on_main(lambda: _evaluate(model, test_ids, splits.test.labels, splits.label_names, cfg,
                                                         accelerator, precision))
            # the step of the weights evaluated: the best epoch's, not the run's last
            best_step = next((r["step"] for r in metrics.records if r.get("split") == "validation"
                              and r.get("epoch") == loop.best_epoch), loop.step)
            metrics.add({"event": "eval", "split": "test", "epoch": loop.best_epoch, "step": best_step,
                         **{k: test[k] for k in ("loss", "accuracy", "macro_f1", "n")}})
            cb.on_eval(metrics.records[-1])

        if main:
            plots.learning_curve(metrics.records, run_dir / runs.CURVE_FILE)
        info.update(
            status="complete",
            device=str(accelerator.device),
            processes=procs.num_processes,  # each on its own device, as ``device`` names the main one's
            # what the config's automatic choices resolved to, and the thread count (float sums in
            # another order): what rerunning its config.yaml elsewhere needs to get the same bits
            torch_threads=torch.get_num_threads(),
            precision=precision,
            fused_accumulation=fuse,
            best_epoch=loop.best_epoch,
            stopped_early_at_epoch=loop.stopped_early,
            optimizer_steps=loop.step,
            metrics={"validation": loop.best_val,
                     "test": {k: test[k] for k in ("accuracy", "macro_f1", "loss", "n")} if test else None},
            throughput={"train_examples_per_s": loop.examples_seen / loop.train_time if loop.train_time else None,
                        "train_tokens_per_s": loop.tokens_seen / loop.train_time if loop.train_time else None,
                        "train_seconds": loop.train_time,
                        "frozen_prefix_layers": prefix.k if train_store is not None else 0,
                        "prefix_cache_seconds": round(cache_seconds, 3) if train_store is not None else None,
                        "cuda_graphs": step_graphs.summary() if step_graphs is not None else None},
            wall_time_s=wall_before + time.perf_counter() - t_start,
        )
        if accelerator.is_main_process:
            write_extras(run_dir, splits, info)
            runs.write_json(run_dir / runs.RUN_FILE, info)  # last write: marks the run complete
        return TrainResult(run_dir, loop.best_epoch, loop.best_val, test, counts.trainable, metrics.records)
    except BaseException as e:
        # Whatever stopped the run (error, Ctrl-C), the directory must not look complete.
        # the time spent so far counts too: a resumed run adds its own to it
        # a second Ctrl-C stops without a new checkpoint: interrupted all the same, resumable from the last one
        interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
        info.update(status="interrupted" if interrupted else "failed", error=str(e) or type(e).__name__,
                    wall_time_s=wall_before + time.perf_counter() - t_start)
        try:
            if main:
                runs.write_json(run_dir / runs.RUN_FILE, info)
        except OSError:
            pass  # the disk that stopped the run refuses this too: the error to report is the first
        raise
    finally:
        for store in locals().get("stores") or []:
            store.close()  # a memory-mapped cache is deleted with its folder
        if callers_accelerate is not None:
            _restore_accelerate_state(callers_accelerate)


def write_extras(run_dir: Path, splits: Splits, info: dict[str, Any], per_class: int = 3) -> None:
    """What ``serve`` and ``report`` show, written before the run is marked complete:
    examples.json (a few short validation texts per class, for the web page's example buttons)
    and report.html / report.md. A report that cannot be made is recorded in run.json
    (``report_error``), never a reason to lose a finished training."""
    from . import report

    examples: dict[str, list[str]] = {n: [] for n in splits.label_names}
    for text, label in sorted(zip(splits.validation.texts, splits.validation.labels.tolist()),
                              key=lambda tl: len(tl[0]) > 300):  # short texts first, else file order
        bucket = examples[splits.label_names[label]]
        if len(bucket) < per_class:
            bucket.append(text)
    runs.write_json(run_dir / runs.EXAMPLES_FILE, examples)
    split, data = ("test", splits.test) if splits.test is not None else ("validation", splits.validation)
    try:
        report.write_report(run_dir, info=info, examples=data, split=split, source=data.source)
    except Exception as e:  # noqa: BLE001 - the adapter and metrics are saved; say why the report is missing
        info["report_error"] = f"{type(e).__name__}: {e}"
