"""Run directories: their layout, atomic writes, the completeness marker, and opening a run.

Layout of RUN_DIR:
    run.json          status ("running" until the very end, then "complete"), versions, data
                      fingerprints, seed, parameter counts, best epoch, metrics by split
    config.yaml       the resolved configuration
    labels.json       class names in index order
    adapter/          PEFT adapter (adapter_config.json + adapter_model.safetensors, head included)
    tokenizer/        the tokenizer, so inference needs nothing but the base weights
    metrics.jsonl     one JSON record per log/eval event, each naming its split
    learning_curve.png
    .lock             held (flock) by the process training the run; holds its pid
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from .config import Config, build_config
from .errors import ConfigError, RunError, brief, first_few

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
CURVE_FILE = "learning_curve.png"
EVAL_DIR = "eval"
LOCK_FILE = ".lock"
EXAMPLES_FILE = "examples.json"  # a few validation texts per class: the served page's example buttons


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(path: Path) -> None:
    """Give ``path`` and everything below it the permissions a plain ``open``/``mkdir`` would
    (0o666/0o777 less the umask). safetensors and mkstemp create files 0600: a run written by one
    account (a trainer) could then not be loaded by another (a server, a teammate)."""
    mask = _umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file object (``mode`` "w": UTF-8 text, "wb": bytes) whose content replaces ``path`` when
    the block ends without error: a reader sees the old file or the new one, never half of one.
    A symlink's target is replaced (the link stays); a device or pipe is written to directly.
    Ordinary permissions: the temporary file is opened 0o666 less the umask, unlike mkstemp's 0600."""
    path = Path(path)
    text = {} if "b" in mode else {"encoding": "utf-8"}
    if path.exists() and not path.is_file():
        # a device or a pipe (--output /dev/stdout): written to, never replaced by a regular file.
        # Asked before resolving links: /dev/stdout into a pipe resolves to no path ("pipe:[N]").
        with open(path, mode, **text) as f:
            yield f
        return
    if path.is_symlink():
        path = path.resolve()  # the file it points to is replaced, the link stays
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, mode, **text) as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        if e.filename not in (None, str(tmp)):
            raise
        # a full disk or a read-only folder names the file the user knows, not our temporary one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place (the old one, if any, is removed first)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Held while a process trains into ``run_dir``: a second ``train --resume`` (or an overwrite)
    of a run that is still training is refused, instead of two processes writing one folder
    (duplicated metrics, checkpoints pruned under the other). The kernel drops the lock when the
    process dies, however it dies. Without flock (Windows, and filesystems that refuse it, such as
    some network mounts) runs are not guarded: training goes on rather than being refused."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(Path(run_dir) / LOCK_FILE, "a+", encoding="ascii") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not _held_elsewhere(e):
                yield
                return
            f.seek(0)
            pid = f.read().strip()
            raise RunError(f"run is being trained by another process{f' (pid {pid})' if pid else ''}",
                           where=str(run_dir), fix="wait for it to finish, or stop it (Ctrl-C) and then resume it") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def is_training(run_dir: Path) -> bool:
    """Is a process training into ``run_dir`` now (holding its :func:`training_lock`)?"""
    try:
        import fcntl

        with open(Path(run_dir) / LOCK_FILE, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                return _held_elsewhere(e)
            return False
    except (ImportError, OSError):
        return False


def _held_elsewhere(e: OSError) -> bool:
    """Did flock fail because another process holds the lock? (Not because the filesystem has no
    locks: ENOLCK, EOPNOTSUPP, ENOSYS, which must not read as "another process is training".)"""
    return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


@contextmanager
def write_errors_as_oserror(where: Path) -> Iterator[None]:
    """safetensors (SafetensorError) and tokenizers (a plain Exception: "... (os error 28)") report
    a failed write (a full disk) in types of their own, which escaped the CLI's one-line disk
    errors as a traceback: made the OSError they are, naming ``where`` (as is an OSError that
    names no file)."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        if e.filename is None:  # a failed write() or fsync() names no file: the one being written
            raise OSError(e.errno, e.strerror or str(e), str(where)) from None
        raise
    except Exception as e:  # noqa: BLE001 - only what reads as an operating-system error is converted
        message = str(e)
        found = re.search(r"os error (\d+)", message)
        if not isinstance(e, SafetensorError) and found is None:
            raise
        code = int(found.group(1)) if found else errno.ENOSPC if "No space left" in message else errno.EIO
        raise OSError(code, os.strerror(code) if found or code == errno.ENOSPC else f"cannot write ({message[:120]})",
                      str(where)) from None


def unreadable_safetensors(files: Iterable[Path]) -> tuple[Path, Exception] | None:
    """The first of ``files`` whose safetensors header cannot be read, with the error (None when
    all can). Reads headers only: a truncated or overwritten file shows up without loading weights."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f, e
    return None


def environment() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "loraclf": __version__,
            "platform": platform.platform()}


def prepare_dir(path: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """Create an empty run directory; refuse to clobber one unless asked to, and even then replace
    only an earlier loraclf run: ``overwrite`` must never delete a folder of the user's own files,
    nor ``inputs`` (the base model and data files the new run reads) kept inside the old run."""
    if path.exists() and not path.is_dir():
        raise RunError("exists and is not a directory", where=str(path), fix="choose another --train.output_dir")
    # A finished run's lock file is left behind (deleting it would race a process taking it); alone,
    # it does not make a folder the user emptied with `rm -rf run/*` "not empty".
    if path.is_dir() and any(p.name != LOCK_FILE or is_training(path) for p in path.iterdir()):
        cwd, target = Path.cwd().resolve(), path.resolve()
        holds_cwd = target == cwd or target in cwd.parents
        inside = [str(p) for p in inputs if target == p.resolve() or target in p.resolve().parents]
        is_run = (path / RUN_FILE).is_file()
        busy = is_run and not holds_cwd and is_training(path)  # asked once, in the order of the refusals below
        if not overwrite:
            # offer --train.overwrite only where it would be accepted (below): an earlier run, not in
            # training, holding none of this run's inputs (those refusals come with overwrite)
            replaceable = is_run and not holds_cwd and not busy and not inside
            raise RunError(("run directory" if is_run else "directory") + " already exists and is not empty" +
                           ("" if is_run or holds_cwd else f" (not a loraclf run: no {RUN_FILE})"), where=str(path),
                           fix="choose another --train.output_dir, " + (
                               "or pass --train.overwrite true to replace it" if replaceable else
                               "e.g. runs/NAME" if holds_cwd else "or empty this folder yourself" if not is_run else
                               "or wait for that training to end" if busy else "or move its inputs out first"))
        if holds_cwd:
            raise RunError("is the current directory or holds it; --train.overwrite will not delete it",
                           where=str(path), fix="choose a subdirectory as --train.output_dir, e.g. runs/NAME")
        if not is_run:
            raise RunError(f"not a loraclf run (no {RUN_FILE}); --train.overwrite replaces only an earlier run",
                           where=str(path), fix="choose another --train.output_dir, or empty this folder yourself")
        if busy:
            raise RunError("run is being trained by another process; --train.overwrite will not delete it",
                           where=str(path), fix="choose another --train.output_dir, or wait for that training to end")
        if inside:
            raise RunError(f"holds {inside[0]}, which this run reads; --train.overwrite will not delete it",
                           where=str(path), fix="move it out of the old run first, or choose another --train.output_dir")
        try:
            shutil.rmtree(path)
        except OSError as e:  # rmtree names files relative to the folder ("run.json")
            raise RunError(f"--train.overwrite cannot delete the old run ({e.strerror or e}: {e.filename})",
                           where=str(path), fix="make it writable, or choose another --train.output_dir") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create run directory ({e.strerror})", where=str(path),
                       fix="choose a writable --train.output_dir") from None


@dataclass
class Run:
    """A finished (or, with ``allow_incomplete``, unfinished) run opened for use."""

    path: Path
    cfg: Config
    label_names: list[str]
    info: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR


# Keys a run's config.yaml may change in after training: where things are (a base model or data
# file that moved; the data fingerprints check the files' content), not what was trained
_RELOCATABLE = {"model": ("name_or_path",), "train": ("output_dir", "overwrite"), "data": ("train", "validation", "test")}


def recipe(cfg: Config) -> dict[str, Any]:
    """What a run trains, as recorded in run.json: its config less :data:`_RELOCATABLE`."""
    doc = cfg.to_dict()
    for section, keys in _RELOCATABLE.items():
        for key in keys:
            doc[section].pop(key, None)
    return doc


def recipe_changes(cfg: Config, then: dict[str, Any]) -> list[str]:
    """``section.key old -> new`` for every recorded key whose value ``cfg`` changed. Keys a later
    loraclf added are not in ``then``: their defaults are no change of the run's."""
    now = json.loads(json.dumps(recipe(cfg)))
    changes = []
    for section, keys in sorted(then.items()):
        for key, old in sorted((keys or {}).items()):
            new = (now.get(section) or {}).get(key)
            if new != old:
                changes.append(f"{section}.{key} {json.dumps(old)} -> {json.dumps(new)}")
    return changes


def open_run(path: str | Path, allow_incomplete: bool = False) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError("no such run directory", where=str(path), fix="give the --train.output_dir of a loraclf run")
    try:
        info = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError("not a loraclf run (no run.json)", where=str(path),
                       fix="give the --train.output_dir of a loraclf run") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunError("run.json is corrupted", where=str(path), fix="train the run again") from None
    if not isinstance(info, dict):
        raise RunError(f"run.json is corrupted (a JSON {type(info).__name__}, not an object)", where=str(path),
                       fix="restore it from a copy, or train the run again")
    if info.get("status") != "complete" and not allow_incomplete:
        if is_training(path):
            raise RunError("run is still training (another process is writing it)", where=str(path),
                           fix="wait for it to finish (evaluate and predict also take --checkpoint: its newest "
                               "checkpoint as it is)")
        raise RunError(f"run is incomplete (status: {info.get('status')!r}); training did not finish", where=str(path),
                       fix=f"finish it with loraclf train --resume {path} (evaluate and predict also take "
                           "--checkpoint: its newest checkpoint as it is)")
    try:
        import yaml

        try:
            raw = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:  # a copy cut short
            raise ValueError(f"{CONFIG_FILE} is not valid YAML: {brief(e, 120)}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{CONFIG_FILE} holds a {type(raw).__name__}, not the sections of a config")
        cfg = build_config(raw, where=str(path / CONFIG_FILE))
        labels = json.loads((path / LABELS_FILE).read_text(encoding="utf-8"))
        if not (isinstance(labels, list) and labels and all(isinstance(n, str) for n in labels)):
            raise ValueError(f"{LABELS_FILE} is not a list of class names")
        if isinstance(info.get("label_names"), list) and labels != info["label_names"]:
            # other classes than the head was trained for: a size mismatch deep in loading, or data
            # rows blamed for labels "out of range"
            raise ValueError(f"{LABELS_FILE} lists {first_few(labels)}, run.json the run's classes "
                             f"{first_few([str(n) for n in info['label_names']])}")
    except FileNotFoundError as e:
        raise RunError(f"run is missing {Path(e.filename).name}", where=str(path), fix="train the run again") from None
    except (ConfigError, ValueError) as e:
        raise RunError(f"run files are corrupted ({e})", where=str(path),
                       fix="restore them from a copy, or train the run again") from None
    then = info.get("recipe")  # runs trained before it was recorded: loading the weights checks their shapes
    changes = recipe_changes(cfg, then) if isinstance(then, dict) else []
    if changes:
        # config.yaml edited since training: a resumed run would go on with other modules, rows or
        # schedule; a finished one would load its weights into another model (another head, rank)
        raise RunError(f"{CONFIG_FILE} differs from the recipe the run was trained with: {first_few(changes)}",
                       where=str(path), fix=f"restore those keys in {CONFIG_FILE} (only where the base model and "
                       "data files are may change), or train a new run with the new recipe")
    for needed in ("adapter_config.json", "adapter_model.safetensors") if info.get("status") == "complete" else ():
        if not (path / ADAPTER_DIR / needed).is_file():
            raise RunError(f"run is missing {ADAPTER_DIR}/{needed}", where=str(path), fix="train the run again")
    return Run(path, cfg, list(labels), info)
