"""The run report: written by train, rewritten by `loraclf report`, self-contained, and its
numbers coming from the one prediction path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from loraclf import cli, report
from loraclf.data import Examples
from loraclf.predict import Predictor


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    for name in (report.HTML_FILE, report.MD_FILE, report.CONFUSION_FILE):
        (dest / name).unlink(missing_ok=True)
    return dest


def _edit_config(run: Path, **data) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"].update(data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_train_writes_a_self_contained_report(trained_run):
    info = json.loads((trained_run / "run.json").read_text())
    assert info["status"] == "complete" and "report_error" not in info
    page = (trained_run / report.HTML_FILE).read_text()
    md = (trained_run / report.MD_FILE).read_text()
    for section in ("Summary", "Metrics", "Trainable parameters", "Learning curve", "Per class (test)",
                    "Confusion matrix", "Most confident mistakes (test)", "Config"):
        assert section in page and section in md, section
    # two figures, inlined; nothing fetched from anywhere
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}">', page)) == 2
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert "![learning curve](learning_curve.png)" in md and (trained_run / report.CONFUSION_FILE).is_file()
    # parameter breakdown, metrics, throughput and wall time from run.json
    assert f"{info['params']['trainable']:,}" in md and f"{info['params']['lora_total']:,}" in md
    assert f"{100 * info['metrics']['test']['accuracy']:.2f} %" in md
    assert f"{100 * info['metrics']['validation']['accuracy']:.2f} %" in md
    assert "training throughput" in md and "wall time" in md and "inference throughput" in md
    for name in info["label_names"]:
        assert f"| {name} |" in md
    # the recomputation on the whole test split reproduces training's test accuracy
    assert f"all {info['metrics']['test']['n']} rows: accuracy {100 * info['metrics']['test']['accuracy']:.2f} %" in md
    assert "status | complete" in md


def test_markdown_cells_show_text_as_written():
    # "<script>" or "</td>" in a class name or text went into report.md raw: viewers render it as HTML
    assert report._md_cell("<script> a|b **x** my_run &amp;\n y") == \
        "\\<script\\> a\\|b \\*\\*x\\*\\* my\\_run \\&amp; y"


def test_importing_and_drawing_leave_the_user_s_matplotlib_backend_alone(tmp_path):
    """plots.py called matplotlib.use("Agg") at import: `from loraclf.train import train` in a
    notebook turned its inline plots off, silently. Figures are now drawn without pyplot."""
    import os
    import subprocess
    import sys

    code = ("import matplotlib, sys; import loraclf.train, loraclf.evaluate; from loraclf import plots; "
            f"plots.confusion_matrix([[1, 0], [0, 1]], ['a', 'b'], __import__('pathlib').Path({str(tmp_path)!r}) / 'c.png', 't'); "
            "plots.learning_curve([{'event': 'train', 'step': 1, 'loss': 1.0}], "
            f"__import__('pathlib').Path({str(tmp_path)!r}) / 'l.png'); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLBACKEND": "svg"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("c.png", "l.png"))


def test_plots_take_class_names_as_plain_text(tmp_path):
    # "$$" (a price tier) was read as mathtext: evaluate and report ended in a ParseException traceback
    from loraclf import plots

    plots.confusion_matrix([[2, 0], [1, 3]], ["$", "$$"], tmp_path / "c.png", "t $x^$")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # written atomically: no temporary file left


@pytest.mark.parametrize("n", [4, 60])
def test_confusion_matrix_figure_stays_bounded_with_many_classes(tmp_path, n):
    """1.2 inches a class: 100 classes took 4.8 GB and 31 s to draw and ~550 passed matplotlib's
    pixel limit, after evaluate had computed its metrics (lost with the traceback)."""
    import struct

    from loraclf import plots

    matrix = [[(i * 7 + j) % 5 for j in range(n)] for i in range(n)]
    plots.confusion_matrix(matrix, [f"class {i}" for i in range(n)], tmp_path / "c.png", "t")
    width, height = struct.unpack(">II", (tmp_path / "c.png").read_bytes()[16:24])  # the PNG's IHDR
    assert width <= 100 * plots.MAX_SIDE_INCHES and height <= 100 * plots.MAX_SIDE_INCHES
    assert width >= 100 * (1.2 * min(n, 4) + 2)  # a few classes keep their roomy cells


def test_examples_are_saved_for_the_page(trained_run):
    examples = json.loads((trained_run / "examples.json").read_text())
    labels = json.loads((trained_run / "labels.json").read_text())
    assert list(examples) == labels
    assert all(1 <= len(v) <= 3 and all(t.strip() for t in v) for v in examples.values())


def test_mistakes_are_the_most_confident_wrong_predictions(trained_run):
    predictor = Predictor.from_run(trained_run, precision="fp32")
    texts = [f"{w} market shares goal coach season" for w in ("war", "match", "bank", "chip")] * 5
    labels = np.array([0, 1, 2, 3] * 5)
    a = report.analyse(predictor, Examples(texts, labels, "made here"), "test", "made here", top_mistakes=4)
    direct = predictor.predict(texts)
    wrong = [i for i, r in enumerate(direct) if r["label"] != predictor.label_names[labels[i]]]
    assert wrong  # (each text mixes words of every class: the model gets many wrong)
    assert a.metrics["accuracy"] == pytest.approx(1 - len(wrong) / len(texts))
    assert len(a.mistakes) == min(4, len(wrong))
    conf = [m["confidence"] for m in a.mistakes]
    assert conf == sorted(conf, reverse=True)
    for m in a.mistakes:
        assert m["true"] != m["predicted"]
        r = next(direct[i] for i in wrong if texts[i] == m["text"])
        assert r["label"] == m["predicted"]
        assert r["probabilities"][m["predicted"]] == pytest.approx(m["confidence"], abs=1e-5)


def test_report_command_with_a_sample_cap(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    assert cli.main(["report", str(run), "--max-examples", "40", "--top-mistakes", "3"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / report.HTML_FILE}" in out and f"wrote {run / report.MD_FILE}" in out
    md = (run / report.MD_FILE).read_text()
    assert "a seeded sample of 40 of 80 rows" in md
    table = md.split("## Most confident mistakes (test)")[1].split("## Config")[0]
    assert len([ln for ln in table.splitlines() if re.match(r"^\| \d+ \|", ln)]) <= 3
    assert (run / report.HTML_FILE).stat().st_mode & 0o044  # readable by others


def test_report_falls_back_to_validation_carved_as_in_training(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path / "run")
    _edit_config(run, test=None)
    report.write_report(run)
    md = (run / report.MD_FILE).read_text()
    info = json.loads((run / "run.json").read_text())
    n_val = info["rows"]["validation"]
    assert "## Per class (validation)" in md and f"all {n_val} rows" in md


def test_unreadable_data_still_gives_a_report(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path / "run")  # no report yet
    (run / report.CONFUSION_FILE).write_bytes(b"an earlier report's plot")
    _edit_config(run, test=str(tmp_path / "gone.csv"))
    written = report.write_report(run)
    md = (run / report.MD_FILE).read_text()
    assert "Not computed:" in md and "gone.csv" in md and "## Learning curve" in md
    assert "gone.csv" in written.problem
    assert not (run / report.CONFUSION_FILE).exists()  # no stale plot beside "not computed"


def test_report_on_a_test_file_changed_since_training_is_refused(trained_run, tmp_path):
    """The report set training's test accuracy beside per-class numbers recomputed on the file as
    it is now (29.17 % beside 25.00 %, exit 0): it now says the data differs, as resume does."""
    from conftest import make_rows, write_agnews_csv

    run = _copy(trained_run, tmp_path / "run")
    test = yaml.safe_load((run / "config.yaml").read_text())["data"]["test"]
    moved = Path(shutil.copy(test, tmp_path / f"moved-{Path(test).name}"))  # the same content elsewhere: fine
    _edit_config(run, test=str(moved))
    assert report.write_report(run).problem is None
    write_agnews_csv(moved, make_rows(40, seed=77))
    from loraclf.errors import DataError

    with pytest.raises(DataError, match="the test data differs from the data the run was trained and tested on"):
        report.write_report(run)  # by hand: the report with the numbers is kept
    for f in (report.HTML_FILE, report.MD_FILE):
        (run / f).unlink()
    assert "the test data differs" in report.write_report(run).problem
    assert "Not computed" in (run / report.MD_FILE).read_text()


def test_report_cli_keeps_a_full_report_when_the_analysis_is_missing(trained_run, tmp_path, capsys):
    """`loraclf report` replaced a full report with one saying "Not computed" (and exited 0 in silence)."""
    run = _copy(trained_run, tmp_path / "run")
    report.write_report(run)
    before = {f: (run / f).read_bytes() for f in (report.HTML_FILE, report.MD_FILE, report.CONFUSION_FILE)}
    assert b"Not computed" not in before[report.MD_FILE]
    _edit_config(run, test=str(tmp_path / "gone.csv"))
    assert cli.main(["report", str(run)]) == 2
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    err = captured.err.strip()
    assert err.startswith("loraclf report: error:") and "\n" not in err
    assert "gone.csv" in err and "existing report.html and report.md were kept" in err
    assert {f: (run / f).read_bytes() for f in before} == before
    # with no report to keep, one is written that says what is missing; the exit code says so too
    for f in before:
        (run / f).unlink()
    assert cli.main(["report", str(run)]) == 2
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "Not computed" in (run / report.MD_FILE).read_text()
    assert "warning: no metrics, confusion matrix or mistakes" in captured.err and "gone.csv" in captured.err


def test_report_of_a_missing_or_incomplete_run_is_one_line(tmp_path, capsys, trained_run):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraclf report: error:") and "\n" not in err
    run = _copy(trained_run, tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    assert cli.main(["report", str(run)]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_a_learning_curve_of_one_logged_step_shows_it(tmp_path, monkeypatch):
    # a run shorter than train.log_every_steps logs one train loss: a plain line drew nothing
    from loraclf import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    plots.learning_curve([{"event": "train", "step": 15, "loss": 1.3}], tmp_path / "l.png")
    (line,) = drawn[0].axes[0].lines
    assert list(line.get_xdata()) == [15] and line.get_marker() not in (None, "None", "", " ")
