"""Kill-and-resume: a run killed with SIGKILL at any point (mid-epoch, at an epoch end, during a
checkpoint write) and resumed ends bit-identical to a run that was never interrupted."""

import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from conftest import make_rows, tiny_overrides, write_agnews_csv
from loraclf import checkpoint
from loraclf.config import load_config
from loraclf.data import LengthGroupedBatchSampler
from loraclf.errors import ModelError, RunError
from loraclf.train import Interrupted, resume, train

SEED = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"
# 72 training rows, 8 per micro-batch, 2 micro-batches per step: 5 steps an epoch, 3 epochs.
EXTRA = {"data.max_train_samples": 72, "data.max_eval_samples": 24, "train.batch_size": 8,
         "train.gradient_accumulation_steps": 2, "train.epochs": 3, "train.checkpoint_every_steps": 1,
         "train.keep_checkpoints": 2}

CHILD = textwrap.dedent("""
    import json, sys
    import loraclf.checkpoint as ck
    from loraclf.config import load_config
    from loraclf.train import train

    real_save_file = ck.save_file
    def slow_save_file(tensors, path):  # widen the write window so a kill can land inside it
        print("writing", flush=True)
        real_save_file(tensors, path)
        import time; time.sleep(0.05)
    ck.save_file = slow_save_file

    class Say:
        def on_start(self, total, info): pass
        def on_step(self, step, record): print(f"step {step}", flush=True)
        def on_eval(self, record): print(f"eval {record['epoch']}", flush=True)

    train(load_config(sys.argv[1], json.loads(sys.argv[2])), Say())
    print("done", flush=True)
""")


def _overrides(tiny_roberta, agnews_files, out):
    return tiny_overrides(tiny_roberta, agnews_files, out, **EXTRA)


_TIMINGS = ("examples_per_s", "train_seconds", "eval_seconds")


def _final(run: Path):
    """What a resumed run must share with the uninterrupted one: the adapter's bytes, the metrics,
    and metrics.jsonl's records but their timings (no record twice: a killed session's lines past
    its checkpoint are dropped)."""
    info = json.loads((run / "run.json").read_text())
    records = [{k: v for k, v in json.loads(line).items() if k not in _TIMINGS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ((run / "adapter" / "adapter_model.safetensors").read_bytes(), info["metrics"], info["optimizer_steps"],
            records)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_roberta, agnews_files):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config(SEED, _overrides(tiny_roberta, agnews_files, out)))
    return _final(out)


def test_metrics_jsonl_is_rewritten_whole_on_resume_and_lost_records_are_said(reference, tiny_roberta, agnews_files,
                                                                              tmp_path, monkeypatch):
    """Resume rewrote metrics.jsonl in place: a full disk or a kill mid-write left it cut off
    mid-record (every later --resume: a JSONDecodeError traceback) or empty (the run completed
    with most of its learning curve gone and nothing said)."""
    import loraclf.runs as runs_mod

    run = tmp_path / "run"
    cb = StopAt(7)
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    log = run / "metrics.jsonl"
    before = log.read_bytes()
    real = runs_mod.os.replace

    def disk_full(src, dst):  # the new file was written, but the disk filled before it took the old one's place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs_mod.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        resume(run)
    monkeypatch.setattr(runs_mod.os, "replace", real)
    assert log.read_bytes() == before and not list(run.glob(".metrics*"))  # the old file, whole
    resume(run)
    assert _final(run) == reference
    assert "metrics_records_lost" not in json.loads((run / "run.json").read_text())
    # records lost from the file (cut short, a damaged line) since: the run goes on and says how many
    run2 = tmp_path / "run2"
    cb = StopAt(7)
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run2)), cb, cb.stop)
    lines = (run2 / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run2 / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:10] + "\n")
    resume(run2)
    info = json.loads((run2 / "run.json").read_text())
    assert info["status"] == "complete" and info["metrics_records_lost"] == len(lines) - 2
    assert _final(run2)[:3] == reference[:3]  # the adapter and metrics are the run's all the same


def _kill_at(marker: str, nth: int, run: Path, overrides: dict) -> None:
    """Start a training child process and SIGKILL it at the nth line equal to ``marker``."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(SEED), json.dumps(overrides)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    seen = 0
    try:
        for line in p.stdout:
            if line.strip() == marker:
                seen += 1
                if seen == nth:
                    p.send_signal(signal.SIGKILL)
                    break
    finally:
        p.kill()
        p.wait()
    assert seen == nth, f"child ended before {marker!r} #{nth}"


# Kill points: (marker, occurrence). 15 optimizer steps; each step writes 4 safetensors files.
_rng = random.Random(1234)
KILLS = sorted({("writing", _rng.randint(5, 55)) for _ in range(4)} |
               {(f"step {_rng.randint(2, 15)}", 1) for _ in range(4)} | {("eval 1", 1), ("eval 2", 1)})


@pytest.mark.parametrize("marker,nth", KILLS, ids=[f"{m.replace(' ', '')}#{n}" for m, n in KILLS])
def test_sigkill_then_resume_is_bit_identical(marker, nth, reference, tiny_roberta, agnews_files, tmp_path):
    run = tmp_path / "run"
    _kill_at(marker, nth, run, _overrides(tiny_roberta, agnews_files, run))
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # killed: nothing claims completion
    resume(run)
    assert _final(run) == reference


class StopAt:
    """A training callback that asks the loop to stop (as Ctrl-C does) at optimizer step ``at``."""

    def __init__(self, at: int):
        self.at, self.stop = at, threading.Event()

    def on_start(self, total, info): pass
    def on_eval(self, record): pass

    def on_step(self, step, record):
        if step == self.at:
            self.stop.set()


def test_stop_request_writes_checkpoint_and_resumes(reference, tiny_roberta, agnews_files, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(SEED, _overrides(tiny_roberta, agnews_files, run))
    cb = StopAt(7)
    with pytest.raises(Interrupted, match="interrupted at step 7") as e:
        train(cfg, cb, cb.stop)
    assert "loraclf train --resume" in str(e.value)
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert checkpoint.latest(run).name == "step-00000007"
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    first = json.loads((run / "run.json").read_text())["wall_time_s"]  # was not recorded when interrupted
    assert first > 0
    resume(run)
    assert _final(run) == reference
    assert json.loads((run / "run.json").read_text())["wall_time_s"] > first  # both sessions count


def test_wall_time_of_a_run_failing_at_its_end_is_counted_once(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    # the failure path added this session's time to a record that already held it
    import errno
    import time

    import loraclf.train

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loraclf.train, "write_extras", disk_full)
    run = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(OSError):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)))
    elapsed = time.perf_counter() - t0
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and 0 < info["wall_time_s"] <= elapsed


def test_a_moved_run_resumes_where_it_is_now(reference, tiny_roberta, agnews_files, tmp_path):
    """The saved config names the old folder; resuming the moved copy must write into the copy."""
    run, moved = tmp_path / "run", tmp_path / "moved"
    cb = StopAt(4)
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    run.rename(moved)
    resume(moved)
    assert not run.exists()
    assert json.loads((moved / "run.json").read_text())["status"] == "complete"
    assert _final(moved) == reference


def test_resume_goes_back_past_a_damaged_checkpoint(reference, tiny_roberta, agnews_files, tmp_path):
    """The newest checkpoint damaged after it was written (a truncating copy): resume starts from
    the one before it, redoes the steps in between, and still ends bit-identical."""
    run = tmp_path / "run"
    cb = StopAt(7)
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    newest = checkpoint.latest(run)
    assert newest.name == "step-00000007"
    f = newest / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    resume(run)
    assert _final(run) == reference
    info = json.loads((run / "run.json").read_text())
    assert info["resumed_past_damaged"] == ["damaged-step-00000007"] and info["status"] == "complete"
    assert (run / "checkpoints" / "damaged-step-00000007").is_dir()


def test_resume_refusals(trained_run, tiny_roberta, agnews_files, tmp_path):
    with pytest.raises(RunError, match="already complete"):
        resume(trained_run)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunError, match="no run.json"):
        resume(run)


@pytest.mark.parametrize("changed", ["train", "test"])
def test_resume_refuses_changed_data(tiny_roberta, agnews_files, tmp_path, changed):
    """Every split's file is compared, the test split's too: its metrics go into run.json."""
    import shutil

    data = {"train": tmp_path / "train.csv.gz", "test": tmp_path / "test.csv"}
    shutil.copy(agnews_files["train"], data["train"])
    shutil.copy(agnews_files["test"], data["test"])
    run = tmp_path / "run"
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, data, run)), stop=stop)
    write_agnews_csv(data[changed], make_rows(240, seed=9))  # same format, other rows
    with pytest.raises(RunError, match="data differs"):
        resume(run)


def test_a_data_file_moved_during_a_pause_is_found_by_editing_config_yaml(reference, tiny_roberta, agnews_files,
                                                                            tmp_path):
    """The fix said to check --data.train, which resume refuses; the path in config.yaml is where
    a moved data file is told, and its content is still checked."""
    import shutil

    data = {"train": tmp_path / "train.csv.gz", "test": agnews_files["test"]}
    shutil.copy(agnews_files["train"], data["train"])
    run = tmp_path / "run"
    cb = StopAt(3)
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, data, run)), cb, cb.stop)
    moved = shutil.move(data["train"], tmp_path / "elsewhere.csv.gz")
    with pytest.raises(Exception, match=rf"file not found — fix: restore the file there, or set its new path in "
                                        rf"{run / 'config.yaml'}"):
        resume(run)
    _edit_config(run, "data", train=str(moved))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "versions": {**info["versions"], "peft": "0.0.1"}}))
    resume(run)
    assert _final(run) == reference
    info = json.loads((run / "run.json").read_text())  # the session under other releases is recorded
    assert info["versions"]["peft"] == "0.0.1" and info["resumed_with_versions"][0]["peft"] != "0.0.1"


def test_same_data_is_compared_by_content_not_path():
    from loraclf.data import same_data as _same_data

    then = {"train": {"path": "/old/train.csv", "sha256": "ab", "bytes": 3}, "validation": {"carved_from": "train"}}
    assert _same_data({**then, "train": {**then["train"], "path": "/new/train.csv"}}, then)  # moved or copied
    assert not _same_data({**then, "train": {**then["train"], "sha256": "cd"}}, then)
    both = {**then, "test": {"path": "/t.csv", "sha256": "ef", "bytes": 3}}
    assert not _same_data({**both, "test": {**both["test"], "sha256": "00"}}, both)
    assert not _same_data(then, both)  # a split the run had is gone


def test_non_finite_loss_stops_and_names_last_checkpoint(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    import loraclf.train as t

    calls = {"n": 0}
    real = t.training_loss

    def nan_on_fourth(logits, labels, smoothing=0.0):
        calls["n"] += 1
        loss = real(logits, labels, smoothing)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(t, "training_loss", nan_on_fourth)
    run = tmp_path / "run"
    with pytest.raises(t.TrainingError) as e:
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)))
    msg = str(e.value)
    assert "loss became nan at step 2" in msg and "step-00000001" in msg
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert checkpoint.latest(run).name == "step-00000001"


def test_cli_uses_checkpoint_when_asked_then_resumes(tiny_roberta, agnews_files, tmp_path, capsys, monkeypatch):
    import loraclf.precision
    from loraclf.cli import main

    run = tmp_path / "run"
    stop = threading.Event()
    stop.set()  # interrupted at the first optimizer step
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), stop=stop)
    assert main(["evaluate", str(run)]) == 2
    assert "run is incomplete" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--checkpoint", "--json", "--precision", "fp32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["weights"].endswith("step-00000001") and r["n"] == 24  # data.max_eval_samples
    # saved under the checkpoint's name: after the run finishes it must not pass for the final evaluation
    assert Path(r["saved_to"]).name == "test.csv.n24.step-00000001.json"
    # without --precision: the one the run trained in (fp32), which an unfinished run's run.json does
    # not hold yet but its checkpoint does; it took "auto" (bf16 on CPUs with AMX) and saved the
    # bf16 metrics under the fp32 evaluation's name
    monkeypatch.setattr(loraclf.precision, "cpu_has_native_bf16", lambda: True)
    assert main(["evaluate", str(run), "--checkpoint", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["precision"] == "fp32" and again["saved_to"] == r["saved_to"] and again["loss"] == r["loss"]
    assert main(["predict", str(run), "--checkpoint", "a goal"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "a goal"
    assert main(["train", "--resume", str(run), "--lora.r", "2"]) == 2
    assert "--resume continues a run with its own saved config" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_checkpoint_weights_are_the_best_epoch_s(tiny_roberta, agnews_files, tmp_path):
    """--checkpoint (evaluate, predict) loads the checkpoint's best epoch, not its current weights."""
    from loraclf.predict import Predictor

    run, at = tmp_path / "run", StopAt(7)  # 5 optimizer steps per epoch: stopped in epoch 2
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), at, stop=at.stop)
    loaded = checkpoint.load(checkpoint.latest(run))
    assert loaded.loop.step == 7 and loaded.best is not None
    model = Predictor.from_run(run, from_checkpoint=True, merge=False, precision="fp32").model
    weights = {n: p.detach() for n, p in model.named_parameters() if n in loaded.best}
    assert weights.keys() == loaded.best.keys()
    assert all(torch.equal(weights[n], loaded.best[n]) for n in weights)
    assert not all(torch.equal(loaded.trainable[n], loaded.best[n]) for n in weights)


def test_a_run_in_training_is_not_trained_twice(trained_run, tmp_path):
    """A second `train --resume` (or an overwrite) of a run still training was let in: two
    processes wrote one folder (every later epoch twice in metrics.jsonl, checkpoints pruned
    under the other), and evaluate's hint for a running run was to start one."""
    import os
    import shutil

    from loraclf import runs

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    with runs.training_lock(run):
        with pytest.raises(RunError, match=rf"being trained by another process \(pid {os.getpid()}\)"):
            resume(run)
        with pytest.raises(RunError, match="still training"):
            runs.open_run(run)
        with pytest.raises(RunError, match="being trained by another process; --train.overwrite will not delete it"):
            runs.prepare_dir(run, overwrite=True)
    with pytest.raises(RunError, match="run is incomplete.*loraclf train --resume"):  # a killed run: resume it
        runs.open_run(run)


class RaiseAt(StopAt):
    """Ctrl-C pressed twice: the loop stops at once, without a new checkpoint."""

    def on_step(self, step, record):
        if step == self.at:
            raise KeyboardInterrupt


def test_second_ctrl_c_leaves_a_resumable_run_and_resume_sweeps_a_killed_prefix_cache(
        reference, tiny_roberta, agnews_files, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), RaiseAt(6))
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"  # was "failed"
    stale = run / ".prefix-cache-killed"  # what an OOM-killed session's disk cache leaves
    stale.mkdir()
    (stale / "hidden.npy").write_bytes(b"\0" * 1024)
    resume(run)
    assert _final(run) == reference and not stale.exists()


def test_logged_losses_of_a_resumed_run_equal_the_uninterrupted_run(tiny_roberta, agnews_files, tmp_path):
    """A stop between checkpoints flushes the loss window early; summed in float32 the two parts
    logged a loss that differed in its last digits from the uninterrupted run's."""
    extra = {**EXTRA, "train.checkpoint_every_steps": 4, "train.log_every_steps": 2, "lora.dropout": 0.3}

    def train_records(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]

    ref = tmp_path / "ref"
    train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, ref, **extra)))
    run = tmp_path / "run"
    cb = StopAt(7)
    with pytest.raises(Interrupted):
        train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, run, **extra)), cb, cb.stop)
    resume(run)
    assert train_records(run) == train_records(ref)


def test_damaged_checkpoint_state_is_one_clear_error(tmp_path):
    ck = tmp_path / "step-00000003"
    ck.mkdir()
    (ck / "state.json").write_text('{"loop": {"step": 3, "epo')
    with pytest.raises(RunError, match=r"checkpoint state.json is damaged .*delete .*step-00000003"):
        checkpoint.load(ck)


def test_a_full_disk_during_a_checkpoint_is_an_oserror_and_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """safetensors raises SafetensorError, not OSError, on a full disk: it escaped the CLI's
    one-line disk errors as a traceback."""
    import errno

    import torch
    from safetensors import SafetensorError

    def full(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OSError) as e:
        checkpoint.save(tmp_path, checkpoint.LoopState(step=1), dict(model.named_parameters()), None, opt, sched, keep=2)
    assert e.value.errno == errno.ENOSPC and "step-00000001" in e.value.filename
    assert not list((tmp_path / "checkpoints").iterdir())
    # the disk full at state.json, after the tensors: the half checkpoint stayed (.step-N.tmp)
    monkeypatch.undo()
    real_open = open

    def full_at_state(path, *args, **kwargs):
        if str(path).endswith("state.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_at_state)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, checkpoint.LoopState(step=1), dict(model.named_parameters()), None, opt, sched, keep=2)
    monkeypatch.undo()
    assert not list((tmp_path / "checkpoints").iterdir())
    # a full disk found by write() or fsync() names no file: the error named none ("error: No
    # space left on device", nothing else); it names the checkpoint now

    def full_at_sync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full_at_sync)
    with pytest.raises(OSError) as e:
        checkpoint.save(tmp_path, checkpoint.LoopState(step=1), dict(model.named_parameters()), None, opt, sched, keep=2)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("step-00000001")
    assert not list((tmp_path / "checkpoints").iterdir())


def test_a_run_stopped_by_a_full_disk_reports_the_disk_not_run_json(tiny_roberta, agnews_files, tmp_path,
                                                                      monkeypatch):
    """The run.json write marking the run failed failed too, and its error replaced the first:
    the CLI blamed run.json."""
    import errno

    import loraclf.runs as runs_mod

    run = tmp_path / "run"
    real = runs_mod.write_json
    calls = []

    def full_after_start(path, obj):
        if Path(path).name == "run.json":
            calls.append(path)
        if len(calls) > 1:  # the first run.json starts the run; the disk is full from then on
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, obj)

    def full_checkpoint(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints" / "step-00000001"))

    monkeypatch.setattr(runs_mod, "write_json", full_after_start)
    monkeypatch.setattr(checkpoint, "save", full_checkpoint)
    with pytest.raises(OSError) as e:
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)))
    assert "checkpoints" in e.value.filename


@pytest.mark.parametrize("missing", ["best", "optimizer"])
def test_resume_goes_back_past_a_checkpoint_missing_a_file(missing, reference, tiny_roberta, agnews_files, tmp_path):
    """A checkpoint whose best.safetensors was deleted passed as readable, trained to the end and
    failed there with a traceback (no best weights to load); a missing optimizer file failed at
    once. Either makes it damaged: resume goes back to the one before it."""
    run = tmp_path / "run"
    cb = StopAt(7)  # after epoch 1 (5 steps): the checkpoint holds a best epoch
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    (run / "checkpoints" / "step-00000007" / f"{missing}.safetensors").unlink()
    assert not checkpoint.readable(run / "checkpoints" / "step-00000007")
    resume(run)
    assert _final(run) == reference
    assert json.loads((run / "run.json").read_text())["resumed_past_damaged"] == ["damaged-step-00000007"]


def test_a_kill_while_replacing_a_checkpoint_of_the_same_step_keeps_it(tmp_path, monkeypatch):
    """With keep_checkpoints 1, the same step written twice deleted the only checkpoint before
    renaming the new one into place: a kill in between left none."""
    import os

    import torch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loop = checkpoint.LoopState(step=4)
    first = checkpoint.save(tmp_path, loop, dict(model.named_parameters()), None, opt, sched, keep=1)
    real_replace = os.replace

    def killed(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise KeyboardInterrupt  # the kill lands before the new checkpoint is renamed into place
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, loop, dict(model.named_parameters()), None, opt, sched, keep=1)
    monkeypatch.undo()
    # a reader finds it where it was moved aside, and leaves it there (a save may be in progress)
    aside = checkpoint.latest(tmp_path)
    assert aside.name == ".step-00000004.old" and checkpoint.readable(aside)
    # resume (under the training lock) puts it back
    assert checkpoint.newest_readable(tmp_path) == (first, []) and checkpoint.readable(first)
    assert not list((tmp_path / "checkpoints").glob(".*.old"))
    # and the next save of that step replaces it cleanly
    assert checkpoint.save(tmp_path, loop, dict(model.named_parameters()), None, opt, sched, keep=1) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]


def test_resume_on_a_device_with_another_fuse_default_keeps_the_run_s_batches(reference, tiny_roberta, agnews_files,
                                                                                tmp_path, monkeypatch):
    """fuse_accumulation null means "on a GPU": a CPU run resumed on a GPU fused its micro-batches
    and read the checkpoint's micro-batch position as a position in fused batches, skipping
    rows. The checkpoint records the choice and the resumed run keeps it."""
    import loraclf.train as tr

    run = tmp_path / "run"
    cb = StopAt(3)  # mid-epoch
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    assert json.loads((checkpoint.latest(run) / "state.json").read_text())["loop"]["fused"] is False
    monkeypatch.setattr(tr, "fuse_accumulation", lambda tc: True)  # what a GPU would choose
    resume(run)
    assert _final(run) == reference


def test_a_checkpoint_from_before_the_fuse_record_resumes_with_its_own_batches(tiny_roberta, agnews_files, tmp_path):
    """Checkpoints written before LoopState.fused existed were cut, when fused, with one micro-batch's
    token budget; resuming one with the budget times gradient_accumulation_steps read its batch
    position in other batches (12 steps became 4). Such a run is emulated by its equivalent, one
    batch of 4 x 4 rows under a budget of 150, relabelled as 4 micro-batches of 4 fused."""
    import shutil

    import yaml

    old_style = {"data.max_train_samples": 96, "train.epochs": 1, "train.fuse_accumulation": True,
                 "train.max_tokens_per_batch": 150, "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 50}
    ref = tmp_path / "ref"
    train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, ref, **old_style, **{
        "train.batch_size": 16, "train.gradient_accumulation_steps": 1})))
    run = shutil.copytree(ref, tmp_path / "run")
    conf = yaml.safe_load((run / "config.yaml").read_text())
    conf["train"].update(batch_size=4, gradient_accumulation_steps=4)
    (run / "config.yaml").write_text(yaml.safe_dump(conf))
    steps = sorted((run / "checkpoints").glob("step-*"))
    assert len(steps) > 4
    for later in steps[2:]:
        shutil.rmtree(later)
    state = json.loads((steps[1] / "state.json").read_text())
    del state["loop"]["fused"], state["loop"]["step_groups"]  # written before the records existed
    (steps[1] / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run / "adapter")
    info = json.loads((run / "run.json").read_text())
    del info["recipe"]  # nor did the recipe record: this run's config.yaml was edited above
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    resume(run)
    assert _final(run) == _final(ref)


def test_a_checkpoint_from_before_step_groups_resumes_with_its_own_batches(tiny_roberta, agnews_files, tmp_path,
                                                                           monkeypatch):
    """Checkpoints written before the sampler grouped rows per optimizer step grouped each
    micro-batch on its own. Resuming one mid-epoch in the new order would train some rows of
    that epoch twice and others not at all; it goes on in its own order. Such a run is emulated
    by the sampler told to group micro-batches alone (what it did then)."""
    import loraclf.train as tr

    def old_sampler(lengths, **kw):
        return LengthGroupedBatchSampler(lengths, **{**kw, "accumulate": 1, "split": True})

    ref, run = tmp_path / "ref", tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(tr, "LengthGroupedBatchSampler", old_sampler)
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, ref)))
        cb = StopAt(3)  # mid-epoch: 5 steps an epoch
        with pytest.raises(Interrupted):
            train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    last = checkpoint.latest(run)
    state = json.loads((last / "state.json").read_text())
    assert state["loop"]["batch"] == 6 and state["loop"]["step_groups"] is True
    del state["loop"]["step_groups"]  # written before the record existed
    (last / "state.json").write_text(json.dumps(state))
    resume(run)
    assert _final(run) == _final(ref)


def _edit_config(run: Path, section: str, **values) -> None:
    import yaml

    conf = yaml.safe_load((run / "config.yaml").read_text())
    conf[section].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(conf))


def _assert_edits_refused(run: Path, error: type, match: str, edits) -> None:
    """Each (section, {key: value}, text) edit of config.yaml makes resume raise ``error`` matching
    ``match`` and naming ``text``; config.yaml is restored after each."""
    original = (run / "config.yaml").read_text()
    for section, values, named in edits:
        _edit_config(run, section, **values)
        with pytest.raises(error, match=match) as e:
            resume(run)
        assert named in str(e.value)
        (run / "config.yaml").write_text(original)


def test_resume_refuses_a_config_edited_since_the_run_started(reference, tiny_roberta, agnews_files, tmp_path):
    """Resume rebuilt the run from config.yaml as it is now: with other target modules it dropped
    the trained ones, started the new ones from scratch with their optimizer state, and called
    the run complete; another seed, row limit or epoch count silently changed the run."""
    run = tmp_path / "run"
    cb = StopAt(7)
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    _assert_edits_refused(run, RunError, "differs from the recipe the run was trained with", (
        ("lora", {"target_modules": ["query", "key"]}, 'lora.target_modules ["query", "value"] -> ["query", "key"]'),
        ("train", {"seed": 7, "epochs": 5}, "train.epochs 3 -> 5, train.seed 42 -> 7"),
        ("data", {"max_train_samples": 150}, "data.max_train_samples 72 -> 150"),
        ("lora", {"r": 8}, "lora.r 4 -> 8")))
    import shutil  # where the base model is may change: a moved model folder is the same model

    moved = shutil.copytree(tiny_roberta, tmp_path / "moved-model")
    _edit_config(run, "model", name_or_path=str(moved))
    resume(run)
    assert _final(run) == reference


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tiny_roberta, agnews_files, tmp_path):
    """A run from before the recipe record, its config.yaml edited: the checkpoint was loaded with
    strict=False, so LoRA on other modules loaded nothing (or a rank change was a traceback)."""
    run = tmp_path / "run"
    cb = StopAt(3)
    with pytest.raises(Interrupted):
        train(load_config(SEED, _overrides(tiny_roberta, agnews_files, run)), cb, cb.stop)
    info = json.loads((run / "run.json").read_text())
    del info["recipe"]
    (run / "run.json").write_text(json.dumps(info))
    _assert_edits_refused(run, ModelError, "the checkpoint does not fit the model config.yaml describes", (
        ("lora", {"target_modules": ["query", "key"]}, "lora_A.default.weight"),
        ("lora", {"r": 8}, "shapes differ, checkpoint vs model")))


def test_resume_keeps_the_precision_the_run_trained_in(reference, tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """precision auto was resolved again on resume: a run moved to a device whose auto differs
    (GPU -> CPU, or a CPU without bf16) went on in another precision, and run.json named only it."""
    import loraclf.precision as prec

    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)  # auto = fp32 here, as the reference ran
    run = tmp_path / "run"
    cb = StopAt(7)
    with pytest.raises(Interrupted):
        train(load_config(SEED, {**_overrides(tiny_roberta, agnews_files, run), "train.precision": "auto"}), cb, cb.stop)
    assert json.loads((checkpoint.latest(run) / "state.json").read_text())["loop"]["precision"] == "fp32"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)  # a device where auto means bf16
    resume(run)
    assert _final(run) == reference and json.loads((run / "run.json").read_text())["precision"] == "fp32"
