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


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
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
    assert {f.name: _mode(f) for f in files} == {f.name: want for f in files}
