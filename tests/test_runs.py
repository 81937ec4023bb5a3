"""Run directories: what --train.overwrite may delete, and the permissions of what a run writes."""

import json
import os
from pathlib import Path

import pytest

from loraclf import runs
from loraclf.errors import RunError


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_overwrite_replaces_an_earlier_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.RUN_FILE).write_text('{"status": "failed"}')
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="already exists"):
        runs.prepare_dir(run, overwrite=False)
    runs.prepare_dir(run, overwrite=True)
    assert run.is_dir() and not any(run.iterdir())


def test_an_old_run_that_cannot_be_deleted_is_one_error_naming_it(tmp_path, monkeypatch):
    """On a read-only run --train.overwrite said only "Read-only file system (run.json)": rmtree
    names files relative to the folder, so the line did not say which run."""
    import errno
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    (run / runs.RUN_FILE).write_text('{"status": "complete"}')

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", "run.json")

    monkeypatch.setattr(shutil, "rmtree", read_only)
    with pytest.raises(RunError) as e:
        runs.prepare_dir(run, overwrite=True)
    assert e.value.where == str(run) and "Read-only file system: run.json" in e.value.what
    assert "\n" not in str(e.value)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    # without --train.overwrite the fix offered it, and then it was refused: it is not offered here
    with pytest.raises(RunError, match=r"directory already exists and is not empty \(not a loraclf run: no "
                                       r"run.json\) — fix: choose another --train.output_dir, or empty this "
                                       r"folder yourself$"):
        runs.prepare_dir(mine, overwrite=False)
    with pytest.raises(RunError, match=r"not a loraclf run \(no run.json\)"):
        runs.prepare_dir(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "sub").is_dir()


@pytest.mark.parametrize("where", [".", ".."])
def test_overwrite_never_deletes_the_current_directory_or_its_parents(where, tmp_path, monkeypatch):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / runs.RUN_FILE).write_text("{}")  # even one that looks like a run
    (tmp_path / runs.RUN_FILE).write_text("{}")
    monkeypatch.chdir(cwd)
    with pytest.raises(RunError, match="is the current directory or holds it"):
        runs.prepare_dir(Path(where), overwrite=True)
    with pytest.raises(RunError, match=r"already exists and is not empty — fix: choose another "
                                       r"--train.output_dir, e.g. runs/NAME$"):  # not: "pass --train.overwrite"
        runs.prepare_dir(Path(where), overwrite=False)
    assert (cwd / runs.RUN_FILE).is_file()


def test_written_files_get_the_umask_not_private_modes(tmp_path):
    old = os.umask(0o027)
    try:
        runs.write_json(tmp_path / "a.json", {"x": 1})
        runs.write_text(tmp_path / "b.txt", "text")
        d = tmp_path / "d"
        (d / "e").mkdir(parents=True)
        (d / "e" / "w.bin").write_bytes(b"1")
        os.chmod(d / "e" / "w.bin", 0o600)  # as safetensors and mkstemp create files
        runs.share_modes(d)
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.txt") == 0o640
    assert _mode(d / "e" / "w.bin") == 0o640 and _mode(d / "e") == 0o750
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_trained_run_is_readable_by_others_under_the_usual_umask(trained_run):
    want = 0o666 & ~runs._umask()
    files = [trained_run / runs.RUN_FILE, trained_run / runs.LABELS_FILE,
             trained_run / runs.ADAPTER_DIR / "adapter_model.safetensors",
             *(trained_run / "checkpoints").glob("*/*.safetensors")]
    assert len(files) > 3
    # keyed by path: every checkpoint holds files of the same names
    assert {str(f.relative_to(trained_run)): _mode(f) for f in files} == {
        str(f.relative_to(trained_run)): want for f in files}


def test_overwrite_is_not_offered_for_a_run_it_would_refuse_to_replace(tmp_path):
    # a run in training, or one holding this run's data: the fix said "pass --train.overwrite true",
    # which was then refused
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.RUN_FILE).write_text("{}")
    (run / "train.csv").write_text("text,label\na,0\n")
    with pytest.raises(RunError) as e:
        runs.prepare_dir(run, overwrite=False, inputs=[run / "train.csv"])
    assert "--train.overwrite" not in str(e.value)
    assert str(e.value).endswith("run directory already exists and is not empty — fix: choose another "
                                 "--train.output_dir, or move its inputs out first")
    with runs.training_lock(run):
        with pytest.raises(RunError) as e:
            runs.prepare_dir(run, overwrite=False)
    assert "--train.overwrite" not in str(e.value)
    # it has a run.json: the message said "(not a loraclf run: no run.json)" and "empty this folder yourself"
    assert str(e.value).endswith("run directory already exists and is not empty — fix: choose another "
                                 "--train.output_dir, or wait for that training to end")
    with pytest.raises(RunError, match="pass --train.overwrite true to replace it"):  # an earlier run, idle
        runs.prepare_dir(run, overwrite=False)


def test_a_finished_runs_lock_file_alone_does_not_make_its_folder_not_empty(tmp_path):
    """`rm -rf run/*` leaves the hidden .lock of the finished run; train then refused the folder
    as "not empty" (and, with --train.overwrite, as "not a loraclf run")."""
    run = tmp_path / "run"
    run.mkdir()
    with runs.training_lock(run):
        pass
    assert [p.name for p in run.iterdir()] == [runs.LOCK_FILE]
    runs.prepare_dir(run, overwrite=False)
    with runs.training_lock(run):  # held: the folder is in use, not empty
        with pytest.raises(RunError, match="already exists and is not empty"):
            runs.prepare_dir(run, overwrite=False)


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP", "ENOSYS"])
def test_a_filesystem_without_locks_trains_unguarded_instead_of_refusing(code, tmp_path, monkeypatch):
    """On mounts that refuse flock every training was refused as "being trained by another
    process" (and left its run.json saying "running")."""
    import errno
    import fcntl

    def no_locks(f, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with runs.training_lock(tmp_path):
        assert not runs.is_training(tmp_path)


def test_a_refused_lock_leaves_no_run_that_claims_to_be_running(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    import fcntl

    from conftest import tiny_overrides

    from loraclf.config import load_config
    from loraclf.train import train

    run = tmp_path / "run"
    run.mkdir()

    def held(f, op):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(RunError, match="being trained by another process"):
        train(load_config(Path(__file__).parents[1] / "configs" / "agnews-seed.yaml",
                          tiny_overrides(tiny_roberta, agnews_files, run)))
    assert not (run / runs.RUN_FILE).exists()


@pytest.mark.parametrize("kept", ["model", "data"])
def test_overwrite_never_deletes_the_base_model_or_data_kept_inside_the_old_run(kept, tiny_roberta, agnews_files,
                                                                                tmp_path):
    """--train.overwrite deleted the old run with the base model (or data file) the new run was
    about to read inside it; training then failed, leaving a run marked failed."""
    import shutil

    from conftest import tiny_overrides
    from loraclf.config import load_config
    from loraclf.train import train

    run = tmp_path / "run"
    run.mkdir()
    (run / runs.RUN_FILE).write_text('{"status": "complete"}')
    model = shutil.copytree(tiny_roberta, run / "mymodel") if kept == "model" else tiny_roberta
    data = dict(agnews_files)
    if kept == "data":
        data["train"] = shutil.copy(agnews_files["train"], run / "mydata.csv.gz")
    seed = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"
    cfg = load_config(seed, {**tiny_overrides(model, data, run), "train.overwrite": True})
    with pytest.raises(RunError, match=f"holds {run / ('mymodel' if kept == 'model' else 'mydata.csv.gz')}, which "
                                       "this run reads"):
        train(cfg)
    assert (run / runs.RUN_FILE).read_text() == '{"status": "complete"}'
    assert (run / "mymodel" / "config.json").is_file() if kept == "model" else (run / "mydata.csv.gz").is_file()
