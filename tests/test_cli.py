"""The CLI end to end: train -> evaluate -> predict through the real entry point, and every
error path ending in one line on stderr with a non-zero exit code and no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from loraclf.cli import main

SEED = str(Path(__file__).parents[1] / "configs" / "agnews-seed.yaml")


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", "null" if v is None else json.dumps(v) if not isinstance(v, str) else v]
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_train_evaluate_predict_end_to_end(tiny_roberta, agnews_files, tmp_path, capsys):
    run = tmp_path / "run"
    o = tiny_overrides(tiny_roberta, agnews_files, run, **{"train.epochs": 1})
    assert main(["train", "--config", SEED, "--quiet", *_args(o)]) == 0
    out = capsys.readouterr().out
    assert f"run: {run}" in out and "test (best epoch): accuracy" in out
    assert json.loads((run / "run.json").read_text())["status"] == "complete"

    assert main(["evaluate", str(run), "--json", "--precision", "fp32"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(metrics) and metrics["n"] == 80

    assert main(["evaluate", str(run), "--data.test", str(agnews_files["train"]), "--data.max_eval_samples", "20"]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "confusion matrix" in table and "(n=20" in table

    assert main(["predict", str(run), "the match goal", "bank shares profit", "--top-k", "2"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["text"] for l in lines] == ["the match goal", "bank shares profit"] and len(lines[0]["top_k"]) == 2

    src = tmp_path / "in.txt"
    src.write_text("first text\nsecond text\n\n")  # blank lines at the end are ignored
    dst = tmp_path / "out.csv"
    assert main(["predict", str(run), "--input", str(src), "--format", "csv", "--output", str(dst)]) == 0
    rows = dst.read_text().splitlines()
    assert rows[0] == "text,label,p_World,p_Sports,p_Business,p_Sci/Tech" and len(rows) == 3

    capsys.readouterr()
    assert main(["predict", str(run), "a", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be >= 1 (got 0)" in _error_line(capsys)
    assert main(["predict", str(run), "the match goal", "bank shares", "--max-tokens", "4"]) == 0
    assert [json.loads(l)["text"] for l in capsys.readouterr().out.splitlines()] == ["the match goal", "bank shares"]

    jl = tmp_path / "in.jsonl"
    jl.write_text('{"body": "robot chip"}\n')
    assert main(["predict", str(run), "--input", str(jl), "--text-column", "body"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "robot chip"
    # RUN_DIR after the flag: a list-taking --text-column swallowed it as a second column
    assert main(["predict", "--input", str(jl), "--text-column", "body", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "robot chip"
    # a mistyped RUN_DIR is named as such, not as a missing "text" column of the input
    assert main(["predict", str(run) + "x", "--input", str(jl)]) == 2
    assert "no such run directory" in _error_line(capsys)


def test_a_run_reads_other_files_as_it_read_its_own(tiny_roberta, tmp_path, capsys):
    """predict --input joins the run's text columns; evaluate --data.test reads the whole file (the
    run's max_eval_samples was for its own data); integer labels are refused where the classes
    were learnt as names."""
    from conftest import make_rows

    names = ["World", "Sports", "Business", "Sci/Tech"]

    def write(path, rows, label=lambda c: names[c]):
        lines = ["title,body,label"] + [f"{t},{d.replace(',', '')},{label(c)}" for c, t, d in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    train = write(tmp_path / "train.csv", make_rows(96, seed=4))
    test = write(tmp_path / "test.csv", make_rows(40, seed=5))
    run = tmp_path / "run"
    o = tiny_overrides(tiny_roberta, {"train": train, "test": test}, run,
                       **{"train.epochs": 1, "data.text_columns": ["title", "body"], "data.max_eval_samples": 10})
    assert main(["train", "--config", SEED, "--quiet", *_args(o)]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), "--input", str(test)]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])["text"]
    title, body = test.read_text().splitlines()[1].split(",")[:2]
    assert first == f"{title} {body}"
    assert main(["predict", str(run), "--input", str(test), "--text-column", "body", "--text-column", "title"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["text"] == f"{body} {title}"
    assert main(["evaluate", str(run), "--data.test", str(test), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 40
    assert main(["evaluate", str(run), "--data.test", str(test), "--data.max_eval_samples", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 5
    ints = write(tmp_path / "ints.csv", make_rows(8, seed=6), label=str)
    assert main(["evaluate", str(run), "--data.test", str(ints)]) == 2
    assert "is an integer, but the classes were learnt as names" in _error_line(capsys)


def test_params_json(tiny_roberta, capsys):
    assert main(["params", "--config", SEED, "--model.name_or_path", str(tiny_roberta), "--lora.layers", "[0,1]",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # r=12 on query and value (32 -> 32) of 2 layers; head: dense 32x32+32, out_proj 32x4+4
    assert data["lora_total"] == 2 * 2 * 12 * (32 + 32)
    assert data["head_total"] == 32 * 32 + 32 + 32 * 4 + 4
    assert data["trainable"] == data["lora_total"] + data["head_total"] and data["within_budget"]
    # over budget: the JSON says so and the exit code is 1, as for the table
    assert main(["params", "--config", SEED, "--model.name_or_path", str(tiny_roberta), "--lora.layers", "[0,1]",
                 "--json", "--train.max_trainable_params", "100"]) == 1
    assert json.loads(capsys.readouterr().out)["within_budget"] is False


def test_params_table_and_over_budget_exit(tiny_roberta, capsys):
    base = ["params", "--config", SEED, "--model.name_or_path", str(tiny_roberta), "--lora.layers", "null"]
    assert main(base) == 0
    assert "trainable" in capsys.readouterr().out
    assert main(base + ["--train.max_trainable_params", "10"]) == 1
    assert "OVER BUDGET" in capsys.readouterr().out


def test_params_refuses_a_default_head_the_checkpoint_lacks_as_train_does(tiny_bert, tmp_path, capsys):
    """params counted 1,156 trainable and exited 0 for a config train refuses (BERT saved without
    its pooler: the default head's pooler would stay random); plan already left it out."""
    from conftest import bert_without_pooler

    bare = bert_without_pooler(tiny_bert, tmp_path / "bert-no-pooler")
    capsys.readouterr()
    base = ["params", "--config", SEED, "--model.name_or_path", str(bare), "--lora.layers", "null"]
    assert main(base) == 2
    assert "model.head default would leave weights the checkpoint lacks random" in _error_line(capsys)
    assert main(base + ["--model.head", "linear"]) == 0


def test_console_script_runs_in_a_subprocess(tiny_roberta):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "loraclf.cli", "params", "--config", SEED, "--model.name_or_path",
                        str(tiny_roberta), "--lora.layers", "[0,1]", "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["trainable"] > 0


ERRORS = [
    (["train", "--config", "nope.yaml"], "config file not found"),
    (["train", "--config", SEED, "--lora.r", "abc", "--lora.rank", "3"], "lora.r"),
    (["train", "--config", SEED, "--bogus.key", "1"], "unknown section"),
    (["train", "--config", SEED, "--lora.r"], "needs a value"),
    (["evaluate", "/no/such/run"], "no such run directory"),
    (["evaluate", "RUN", "--lora.r", "3"], "evaluate does not take --lora.r"),
    (["predict", "/no/such/run", "text"], "no such run directory"),
    (["predict", "RUN", "ok", ""], "text 2 is empty"),
    (["predict", "RUN", "--input", "/no/such/file.txt"], "file not found"),
    (["predict", "RUN", "--input", "/no/such/file.csv"], "check the path given to --input"),
    (["predict", "RUN", "--input", "/tmp"], "/tmp: is a directory"),
    # undecodable bytes in argv arrive as lone surrogates; the tokenizer raised a TypeError on them
    (["predict", "RUN", "ok", "\udcff abc"], "text 2 is not valid Unicode"),
    (["evaluate", "RUN", "--data.test", "null"], "command line: --data.test is empty"),
    (["predict", "RUN", "x", "--top-k", "0"], "--top-k must be >= 1"),
    # batch size 0 or below: report looped forever, its memory growing
    (["report", "RUN", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["report", "RUN", "--batch-size", "-3"], "--batch-size must be >= 1"),
    (["predict", "RUN", "x", "--output", "/no/such/dir/o.jsonl"], "folder /no/such/dir does not exist"),
    (["plan", "--config", SEED, "--write", "/no/such/dir/p.yaml"], "folder /no/such/dir does not exist"),
    # evaluate validates its --data.* options like train does: one line, no pydantic traceback
    (["evaluate", "RUN", "--data.max_eval_samples", "0"], "command line: --data.max_eval_samples: Input should be"),
    (["evaluate", "RUN", "--data.format", "xml"], "command line: --data.format: Input should be"),
    (["evaluate", "RUN", "--data.text_columns", "text"], "command line: --data.text_columns: Input should be a valid list"),
    # --resume "$RUN" with RUN unset started a new run from the default config
    (["train", "--resume", ""], "command line: --resume is empty"),
    (["train", "--config", SEED, "--data.validation_size", "2.5"], "neither a fraction (below 1) nor a whole number"),
    # an element of a list typed on the command line too
    (["train", "--config", SEED, "--lora.target_modules", "[query,5]"],
     "command line: --lora.target_modules.1: Input should be"),
    # a misspelt key typed on the command line is blamed on the command line, not the YAML file
    (["train", "--config", SEED, "--train.epochz", "3"], "command line: unknown key '--train.epochz'"),
]


@pytest.mark.parametrize("argv,expected", ERRORS, ids=[" ".join(a[:3]) for a, _ in ERRORS])
def test_errors_are_one_clear_line(argv, expected, trained_run, capsys):
    argv = [str(trained_run) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert expected in line and line.startswith("loraclf ")


@pytest.mark.parametrize("extra,expected", [
    ({"data.train": "/no/such/train.csv"}, "file not found"),
    ({"data.text_columns": ["body"]}, "no column(s) ['body']"),
    ({"data.label_column": "topic"}, "no label column 'topic'"),
    ({"lora.layers": [0, 9]}, "layer(s) [9] do not exist"),
    ({"train.max_trainable_params": 50}, "exceed the budget of 50"),
    ({"model.name_or_path": "no-such-org/no-such-model"}, "not reachable on the Hugging Face Hub"),
    ({"data.train": "no-such-org/no-such-dataset"}, "cannot load dataset 'no-such-org/no-such-dataset'"),
])
def test_train_errors_leave_nothing_behind(extra, expected, tiny_roberta, agnews_files, tmp_path, capsys):
    run = tmp_path / "run"
    o = tiny_overrides(tiny_roberta, agnews_files, run, **extra)
    assert main(["train", "--config", SEED, "--quiet", *_args(o)]) == 2
    assert expected in _error_line(capsys)
    assert not run.exists()


@pytest.mark.parametrize("stdin,expected", [
    ("", "stdin: no texts to classify"),
    ("\n\n", "stdin: no texts to classify"),
    ("first\n\nthird\n", "stdin: line 2 is empty"),  # skipping it would misalign outputs and inputs
])
def test_predict_stdin_errors(stdin, expected, trained_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["predict", str(trained_run)]) == 2
    assert expected in _error_line(capsys)


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_predict_stdin_that_is_not_utf8_is_one_line(errors, trained_run, capsys, monkeypatch):
    import io

    # what Python gives a program for a pipe: strict decoding under a UTF-8 locale (en_US.UTF-8:
    # a UnicodeDecodeError traceback before), surrogateescape under C/POSIX
    stdin = io.TextIOWrapper(io.BytesIO(b"abc\n\xff def\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["predict", str(trained_run)]) == 2
    assert "stdin: line 2 is not valid UTF-8" in _error_line(capsys)


def test_predict_input_dash_is_stdin(trained_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"bank profit\n"), encoding="utf-8"))
    assert main(["predict", str(trained_run), "--input", "-"]) == 0
    assert _predicted_texts(capsys) == ["bank profit"]


def test_predict_a_lone_dash_text_is_stdin(trained_run, capsys, monkeypatch):
    """``predict RUN -`` classified the string "-" and left stdin unread, exit 0."""
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"bank profit\n"), encoding="utf-8"))
    assert main(["predict", str(trained_run), "-"]) == 0
    assert _predicted_texts(capsys) == ["bank profit"]
    assert main(["predict", str(trained_run), "--", "-"]) == 0  # the text "-", asked for plainly
    assert _predicted_texts(capsys) == ["-"]


def test_predict_paths_with_a_tilde_are_the_home_folder_s(trained_run, tmp_path, capsys, monkeypatch):
    """``--input=~/in.jsonl`` (the shell leaves ~ alone after '=') was read from the home folder
    but compared unexpanded with ``--output in.jsonl`` there: the predictions replaced the texts."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"text": "bank shares"}\n')
    (tmp_path / "in.txt").write_text("goal\n")
    run = str(trained_run)
    assert main(["predict", run, "--input=~/in.jsonl", "--output", "in.jsonl"]) == 2
    assert "is the --input file" in _error_line(capsys)
    assert (tmp_path / "in.jsonl").read_text() == '{"text": "bank shares"}\n'
    # .txt input and --output: "file not found" and "folder ~ does not exist" before
    assert main(["predict", run, "--input=~/in.txt", "--output=~/out.jsonl"]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["text"] == "goal"


def test_predict_reads_texts_from_a_named_pipe(trained_run, tmp_path, capsys):
    """``--input <(...)`` or a fifo: "file not found" before (it is no regular file)."""
    import threading

    fifo = tmp_path / "texts"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("goal\nbank\n"), daemon=True)
    writer.start()
    assert main(["predict", str(trained_run), "--input", str(fifo)]) == 0
    writer.join(10)
    assert _predicted_texts(capsys) == ["goal", "bank"]


@pytest.mark.parametrize("argv, expected", [
    (["predict", "RUN", "goal", "--output", ""], "--output is empty"),
    (["predict", "RUN", "--input", ""], "--input is empty"),  # read stdin instead
    (["evaluate", "RUN", "--data.test", ""], "--data.test: no file named (the value is empty)"),  # ". : is a directory"
    # "$RUN" with RUN unset: the working directory, taken for the run when it is one
    (["evaluate", ""], "command line: RUN_DIR is empty — fix: give RUN_DIR the run directory"),
    (["report", " "], "command line: RUN_DIR is empty"),
    (["train", "--config", ""], "command line: --config is empty — fix: give --config a file name"),
    (["plan", "--write", ""], "command line: --write is empty"),
])
def test_empty_path_values_are_named_as_empty(argv, expected, trained_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("goal\n"))
    monkeypatch.chdir(trained_run)  # where "" would name the run: still refused
    assert main([str(trained_run) if a == "RUN" else a for a in argv]) == 2
    assert expected in _error_line(capsys)
    assert not (trained_run / "eval").exists()


def test_predict_to_a_stdout_that_cannot_show_every_character(trained_run):
    """A cp1252 pipe (Windows' default when stdout is redirected): a UnicodeEncodeError traceback
    before. JSON Lines stay exact through \\u escapes; CSV and tables get backslash escapes."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    text = "great match \U0001F600 caf\u00e9"
    for fmt in ("jsonl", "csv"):
        p = subprocess.run([sys.executable, "-m", "loraclf.cli", "predict", str(trained_run), text, "--format", fmt],
                           capture_output=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        out = p.stdout.decode("cp1252")
        if fmt == "jsonl":
            assert json.loads(out)["text"] == text
        else:
            assert "great match \\U0001f600 caf\u00e9" in out


def test_predict_refuses_texts_and_input_together(trained_run, tmp_path, capsys):
    # "--input in.txt out.jsonl" (a forgotten --output) classified the string "out.jsonl", exit 0
    (tmp_path / "in.txt").write_text("goal\nbank\n")
    assert main(["predict", str(trained_run), "--input", str(tmp_path / "in.txt"), "out.jsonl"]) == 2
    err = _error_line(capsys)
    assert "texts given both as arguments ('out.jsonl', ...) and with --input" in err and "--output FILE" in err


def test_predict_output_mistakes_are_caught(trained_run, tmp_path, capsys):
    """--output p.csv without --format wrote JSON lines into p.csv; --output equal to --input
    replaced the texts with predictions; --text-column with a .txt file or text arguments was
    ignored in silence."""
    texts = tmp_path / "in.txt"
    texts.write_text("goal\nbank\n")
    run = str(trained_run)
    assert main(["predict", run, "--input", str(texts), "--output", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().startswith("text,label,p_World")
    assert main(["predict", run, "goal", "--output", str(tmp_path / "p.CSV"), "--format", "jsonl"]) == 0
    assert json.loads((tmp_path / "p.CSV").read_text())["text"] == "goal"  # an explicit --format wins
    capsys.readouterr()
    assert main(["predict", run, "--input", str(texts), "--output", str(texts)]) == 2
    assert "is the --input file: the predictions would replace the texts" in _error_line(capsys)
    assert texts.read_text() == "goal\nbank\n"
    # the run's own files: "wrote 3 predictions" over labels.json broke the run for every later command
    for own in ("labels.json", "run.json", "adapter/adapter_config.json", "eval/x.jsonl", "checkpoints/p.jsonl"):
        before = sorted((p, p.stat().st_mtime_ns) for p in trained_run.rglob("*"))
        assert main(["predict", run, "goal", "--output", str(trained_run / own)]) == 2
        assert "is one of the run's own files" in _error_line(capsys)
        assert sorted((p, p.stat().st_mtime_ns) for p in trained_run.rglob("*")) == before
    mine = trained_run / "predictions.jsonl"  # other files in the run folder are the user's
    assert main(["predict", run, "goal", "--output", str(mine)]) == 0
    mine.unlink()
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")  # a parent that is a file was "folder ... does not exist"
    assert main(["predict", run, "goal", "--output", str(tmp_path / "afile" / "o.jsonl")]) == 2
    assert "afile is a file, not a folder" in _error_line(capsys)
    for argv in (["--input", str(texts)], ["goal"]):
        assert main(["predict", run, *argv, "--text-column", "title"]) == 2
        assert "--text-column applies to CSV/TSV/JSONL/Parquet --input files" in _error_line(capsys)


def test_predict_unknown_extension_says_what_predict_accepts(trained_run, tmp_path, capsys):
    # the fix said "or set --data.format", which predict then refused
    (tmp_path / "a.dat").write_text("text\ngoal\n")
    assert main(["predict", str(trained_run), "--input", str(tmp_path / "a.dat")]) == 2
    err = _error_line(capsys)
    assert "cannot tell the format of 'a.dat'" in err and "name the file .txt, .csv" in err
    assert "--data.format" not in err


def test_sigterm_ends_a_command_like_ctrl_c(trained_run, tmp_path, capsys, monkeypatch):
    # SIGTERM killed predict/evaluate/report silently with exit 143
    import signal

    import loraclf.predict

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(loraclf.predict.Predictor, "from_run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["predict", str(trained_run), "goal", "--output", str(tmp_path / "o.jsonl")]) == 130
    assert _error_line(capsys) == "loraclf predict: interrupted"
    assert not (tmp_path / "o.jsonl").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # restored for whoever called main()


def test_predict_output_to_a_pipe_or_symlink_is_written_not_replaced(trained_run, tmp_path, capsys):
    # the atomic write replaced the path with a regular file: /dev/full (as root) became a file
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    # daemon: where the fifo was replaced (the old behaviour) the reader would wait for ever
    reader = __import__("threading").Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main(["predict", str(trained_run), "goal", "--output", str(fifo)]) == 0
    reader.join(10)
    assert fifo.is_fifo() and got and json.loads(got[0])["text"] == "goal"
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(target)
    assert main(["predict", str(trained_run), "bank", "--output", str(tmp_path / "link.jsonl")]) == 0
    assert (tmp_path / "link.jsonl").is_symlink() and json.loads(target.read_text())["text"] == "bank"
    # /dev/stdout into a pipe: the link resolves to "pipe:[N]", where no file can be made
    p = subprocess.run([sys.executable, "-m", "loraclf.cli", "predict", str(trained_run), "goal", "--output",
                        "/dev/stdout"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["text"] == "goal", p.stderr


def test_predict_output_that_cannot_be_written_exits_1(trained_run, tmp_path, capsys, monkeypatch):
    # a machine failure (disk full) exited 2, as if the command line were wrong
    import errno

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    assert main(["predict", str(trained_run), "goal", "--output", str(tmp_path / "o.jsonl")]) == 1
    err = _error_line(capsys)
    assert err == (f"loraclf predict: error: No space left on device ({tmp_path / 'o.jsonl'}) — fix: free disk "
                   "space, then run it again")
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def _predicted_texts(capsys) -> list[str]:
    # split at \n only: JSON Lines written with ensure_ascii=False may hold U+2028 inside a string
    return [json.loads(line)["text"] for line in capsys.readouterr().out.split("\n") if line]


def test_predict_input_files_one_text_per_line(trained_run, tmp_path, capsys, monkeypatch):
    import gzip
    import io

    # only \n and \r\n end a line: a form feed or U+2028 inside a text must not split it
    (tmp_path / "t.txt").write_text("shares\u2028market\r\ngoal\x0cmatch\x85 now\n\n", encoding="utf-8")
    assert main(["predict", str(trained_run), "--input", str(tmp_path / "t.txt")]) == 0
    assert _predicted_texts(capsys) == ["shares\u2028market", "goal\x0cmatch\x85 now"]
    with gzip.open(tmp_path / "t.txt.gz", "wt", encoding="utf-8") as f:
        f.write("bank profit\nleague goal\n")
    assert main(["predict", str(trained_run), "--input", str(tmp_path / "t.txt.gz")]) == 0
    assert _predicted_texts(capsys) == ["bank profit", "league goal"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffbank profit\n"))  # a byte-order mark is not text
    assert main(["predict", str(trained_run)]) == 0
    assert _predicted_texts(capsys) == ["bank profit"]


@pytest.mark.parametrize("row,expected", [
    ('{"text": null}', "row 2: column 'text' holds NoneType None, not text"),
    ('{"text": 5}', "row 2: column 'text' holds int 5, not text"),
    ('{"other": "x"}', "row 2: column 'text' holds NoneType None, not text"),
    ('{"text": "  "}', "row 2: empty text"),
])
def test_predict_table_input_rows_are_checked(row, expected, trained_run, tmp_path, capsys):
    # these were classified as the text "None" / "5"
    (tmp_path / "in.jsonl").write_text('{"text": "bank shares"}\n' + row + "\n", encoding="utf-8")
    assert main(["predict", str(trained_run), "--input", str(tmp_path / "in.jsonl")]) == 2
    line = _error_line(capsys)
    assert expected in line and "in.jsonl" in line


def test_predict_cuda_graphs_flag(trained_run, capsys, monkeypatch):
    """--cuda-graphs reaches the Predictor: auto (None: on for a CUDA GPU), on, off; on on this
    CPU is one error line."""
    assert main(["predict", str(trained_run), "--cuda-graphs", "on", "bank shares rise"]) == 2
    err = _error_line(capsys)
    assert "CUDA graphs need a CUDA device, not cpu" in err and "auto or off" in err
    assert main(["predict", str(trained_run), "--cuda-graphs", "off", "bank shares rise"]) == 0
    off = capsys.readouterr().out
    assert main(["predict", str(trained_run), "bank shares rise"]) == 0
    assert capsys.readouterr().out == off
    import loraclf.predict

    seen = []
    real = loraclf.predict.Predictor.from_run.__func__
    monkeypatch.setattr(loraclf.predict.Predictor, "from_run",
                        classmethod(lambda cls, *a, **k: seen.append(k["cuda_graphs"]) or real(cls, *a, **k)))
    for flag in ("auto", "on", "off"):
        main(["predict", str(trained_run), "--cuda-graphs", flag, "x"])
    assert seen == [None, True, False]


def test_predict_texts_after_double_dash(trained_run, capsys):
    assert main(["predict", str(trained_run), "--top-k", "2", "--", "-5% shares fall", "--data.x 1"]) == 0
    assert _predicted_texts(capsys) == ["-5% shares fall", "--data.x 1"]
    # without "--" such a text is an unknown option: the error says where it goes
    with pytest.raises(SystemExit) as e:
        main(["predict", str(trained_run), "-dash"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "a text starting with '-' goes after '--': loraclf predict RUN_DIR -- -dash" in err
    assert err.startswith("usage: loraclf predict [-h]")  # the command's usage, not loraclf's


def test_predict_output_to_a_missing_folder_writes_nothing(trained_run, tmp_path, capsys):
    out = tmp_path / "missing" / "o.jsonl"
    assert main(["predict", str(trained_run), "x", "--output", str(out)]) == 2
    assert "does not exist" in _error_line(capsys)
    assert not (tmp_path / "missing").exists()


def test_predict_csv_has_top_k_columns(trained_run, capsys):
    assert main(["predict", str(trained_run), "bank shares profit", "--format", "csv", "--top-k", "2",
                 "--precision", "fp32"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    cols = header.split(",")
    assert cols[-4:] == ["top1_label", "top1_probability", "top2_label", "top2_probability"]
    values = dict(zip(cols, row.split(",")))
    probs = {c[2:]: float(v) for c, v in values.items() if c.startswith("p_")}
    ranked = sorted(probs, key=probs.get, reverse=True)
    assert [values["top1_label"], values["top2_label"]] == ranked[:2] == [values["label"], ranked[1]]
    assert float(values["top2_probability"]) == probs[ranked[1]]


def test_evaluating_a_subset_keeps_the_full_evaluation(trained_run, capsys):
    assert main(["evaluate", str(trained_run), "--precision", "fp32"]) == 0
    full = json.loads((trained_run / "eval" / "test.csv.json").read_text())
    assert main(["evaluate", str(trained_run), "--precision", "fp32", "--data.max_eval_samples", "5"]) == 0
    assert json.loads((trained_run / "eval" / "test.csv.json").read_text()) == full and full["n"] == 80
    assert json.loads((trained_run / "eval" / "test.csv.n5.json").read_text())["n"] == 5
    # a limit above the file's 80 rows takes them all: that is the full evaluation, not a ".n500"
    assert main(["evaluate", str(trained_run), "--precision", "fp32", "--data.max_eval_samples", "500"]) == 0
    assert not (trained_run / "eval" / "test.csv.n500.json").exists()
    assert json.loads((trained_run / "eval" / "test.csv.json").read_text())["n"] == 80
    # ... and so does a limit equal to them (it was saved as ".n80")
    assert main(["evaluate", str(trained_run), "--precision", "fp32", "--data.max_eval_samples", "80"]) == 0
    assert not (trained_run / "eval" / "test.csv.n80.json").exists()


def test_evaluate_keeps_files_of_the_same_name_apart(trained_run, tmp_path, capsys):
    import shutil

    from conftest import make_rows, write_agnews_csv

    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval", ignore_errors=True)
    a, b = tmp_path / "a" / "test.csv", tmp_path / "b" / "test.csv"
    for path, n in ((a, 12), (b, 5)):
        path.parent.mkdir()
        write_agnews_csv(path, make_rows(n, seed=n))
    for path in (a, b, b):  # b twice: its second evaluation replaces its first
        assert main(["evaluate", str(run), "--precision", "fp32", "--data.test", str(path)]) == 0
    saved = [json.loads(p.read_text()) for p in (run / "eval").glob("*.json")]
    assert sorted((r["source_path"], r["n"]) for r in saved) == [(str(a), 12), (str(b), 5)]
    assert (run / "eval" / "test.csv.json").is_file()  # the first keeps the plain name


def test_evaluate_says_when_the_run_s_test_file_changed_since_training(trained_run, agnews_files, tmp_path, capsys):
    """run.json holds the test file's sha256, but evaluate never compared it: a test file cut to
    70 rows after training gave other metrics in eval/test.csv.json with nothing said."""
    import shutil

    import yaml

    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval", ignore_errors=True)  # (other tests' evaluations of the original)
    test = shutil.copy(agnews_files["test"], tmp_path / "test.csv")  # the same content elsewhere
    conf = yaml.safe_load((run / "config.yaml").read_text())
    conf["data"]["test"] = str(test)
    (run / "config.yaml").write_text(yaml.safe_dump(conf))
    base = ["evaluate", str(run), "--precision", "fp32", "--json"]
    assert main(base) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["same_data_as_training_test"] is True and "warning" not in err
    lines = Path(test).read_text().splitlines(keepends=True)
    Path(test).write_text("".join(lines[:70]))
    for args in (base, base + ["--data.test", str(test)]):
        assert main(args) == 0
        out, err = capsys.readouterr()
        r = json.loads(out)
        assert r["n"] == 70 and r["same_data_as_training_test"] is False
        assert err.count("\n") == 1 and "changed since training tested the run on it" in err
    saved = json.loads((run / "eval" / "test.csv.json").read_text())
    assert saved["same_data_as_training_test"] is False and len(saved["data_fingerprint"]["sha256"]) == 64
    other = tmp_path / "other.csv"
    other.write_text("".join(lines[:30]))
    assert main(base + ["--data.test", str(other)]) == 0  # another file: nothing to compare it with
    out, err = capsys.readouterr()
    assert "same_data_as_training_test" not in json.loads(out) and not err


def test_evaluate_reads_another_test_file_by_its_own_format_and_takes_the_text_limit(trained_run, tmp_path, capsys):
    """evaluate --data.test inherited the run's data.format (a Parquet file read as CSV: 'not
    valid UTF-8'); the over-long-text error said to raise --data.max_text_chars, which evaluate
    refused."""
    import shutil

    import pandas as pd
    import yaml

    run = shutil.copytree(trained_run, tmp_path / "run")
    conf = yaml.safe_load((run / "config.yaml").read_text())
    conf["data"]["format"] = "agnews"  # what its own (headerless) files are: a run trained so
    (run / "config.yaml").write_text(yaml.safe_dump(conf))
    info = json.loads((run / "run.json").read_text())
    info["recipe"]["data"]["format"] = "agnews"
    (run / "run.json").write_text(json.dumps(info))
    names = ["World", "Sports", "Business", "Sci/Tech"]
    texts = ["war minister treaty", "goal striker " * 20, "bank profit shares", "chip robot space"]
    pd.DataFrame({"text": texts, "label": names}).to_parquet(tmp_path / "t.parquet")
    base = ["evaluate", str(run), "--precision", "fp32", "--data.test", str(tmp_path / "t.parquet"), "--json"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    assert main(base + ["--data.max_text_chars", "100"]) == 2
    assert "raise --data.max_text_chars" in _error_line(capsys)
    assert main(base + ["--data.max_text_chars", "1000"]) == 0


def test_evaluate_names_hub_splits_apart(trained_run):
    from loraclf.evaluate import evaluation_name
    from loraclf.runs import open_run

    run = open_run(trained_run)
    assert evaluation_name(run, "fancyzhx/ag_news:test") == "ag_news.test"
    assert evaluation_name(run, "fancyzhx/ag_news:train", 100) == "ag_news.train.n100"
    assert evaluation_name(run, "fancyzhx/ag_news") == "ag_news"


def test_evaluate_a_run_it_cannot_write_still_reports(trained_run, capsys, monkeypatch):
    import loraclf.evaluate

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(loraclf.evaluate, "write_evaluation", read_only)
    assert main(["evaluate", str(trained_run), "--precision", "fp32", "--json"]) == 0
    out = capsys.readouterr()
    r = json.loads(out.out)
    assert r["n"] == 80 and r["saved_to"] is None and 0 <= r["accuracy"] <= 1
    assert out.err.strip() == (f"loraclf evaluate: warning: metrics not saved: cannot write {trained_run / 'eval'} "
                               "(Read-only file system)")


def test_evaluate_keeps_its_metrics_when_the_figure_cannot_be_drawn(trained_run, tmp_path, capsys, monkeypatch):
    """A figure matplotlib failed to draw (too many classes, a font problem) ended evaluate in a
    traceback after its metrics were computed, and no metrics JSON was written."""
    import shutil

    import loraclf.plots

    def broken(*a, **k):
        raise ValueError("Image size of 90000x90000 pixels is too large")

    monkeypatch.setattr(loraclf.plots, "confusion_matrix", broken)
    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval", ignore_errors=True)
    assert main(["evaluate", str(run), "--precision", "fp32", "--json"]) == 0
    out = capsys.readouterr()
    saved = json.loads(Path(json.loads(out.out)["saved_to"]).read_text())
    assert saved["n"] == 80 and saved["plot_error"].startswith("ValueError: Image size")
    assert "warning: confusion-matrix figure not drawn: ValueError" in out.err


def test_empty_text_row_in_training_data(tiny_roberta, agnews_files, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine text,0\n  ,1\n")
    o = tiny_overrides(tiny_roberta, {"train": bad, "test": agnews_files["test"]}, tmp_path / "run")
    assert main(["train", "--config", SEED, *_args(o)]) == 2
    line = _error_line(capsys)
    assert "bad.csv" in line and "row 2 (line 3): empty text" in line


def test_unknown_label_in_eval_data(trained_run, tmp_path, capsys):
    bad = tmp_path / "eval.csv"
    bad.write_text("text,label\nfine text,World\nother,Weather\n")
    assert main(["evaluate", str(trained_run), "--data.test", str(bad)]) == 2
    assert "row 2 (line 3): label 'Weather' is not one of the classes" in _error_line(capsys)


def test_disk_full_while_writing_the_run_is_one_line(tiny_roberta, agnews_files, tmp_path, capsys, monkeypatch):
    import errno

    import loraclf.runs as runs

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs, "write_json", full)
    o = tiny_overrides(tiny_roberta, agnews_files, tmp_path / "run")
    assert main(["train", "--config", SEED, "--quiet", *_args(o)]) == 1
    line = _error_line(capsys)
    assert "No space left on device" in line and "labels.json" in line
    assert not (tmp_path / "run" / "run.json").exists()  # nothing that looks like a run


def test_disk_full_while_saving_the_tokenizer_is_one_line_and_leaves_no_run(tiny_roberta, agnews_files, tmp_path,
                                                                            capsys, monkeypatch):
    """tokenizers reports a full disk as a plain Exception ("... (os error 28)"): a traceback, and
    run.json stayed "running" for a run that never started."""
    from transformers import PreTrainedTokenizerFast

    def full(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full)
    run = tmp_path / "run"
    o = tiny_overrides(tiny_roberta, agnews_files, run)
    assert main(["train", "--config", SEED, "--quiet", *_args(o)]) == 1
    assert _error_line(capsys) == (f"loraclf train: error: No space left on device ({run / 'tokenizer'}) — fix: free "
                                   "disk space, then run it again (an interrupted training continues with --resume "
                                   "RUN_DIR)")
    assert [p.name for p in run.iterdir() if p.name != ".lock"] == []
    monkeypatch.undo()
    assert main(["train", "--config", SEED, "--quiet", *_args(o)]) == 0  # the same folder trains as it is
    capsys.readouterr()


def test_a_read_only_folder_names_the_file_not_a_temporary_one(tmp_path, monkeypatch, capsys):
    """atomic_file's temporary name ('.report_confusion.png.15049.972f9eb6.tmp') was what a user
    read in the error line of a read-only run folder, with no fix."""
    import errno

    from loraclf import cli
    from loraclf.runs import write_text

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError) as e:
        write_text(tmp_path / "report.md", "x")
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "report.md")
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "report": lambda args, o: write_text(tmp_path / "r.md", "x")})
    assert main(["report", str(tmp_path)]) == 1
    assert _error_line(capsys) == (f"loraclf report: error: Read-only file system ({tmp_path / 'r.md'}) — fix: make "
                                   "that folder writable, or write elsewhere")


def test_output_into_a_closed_pipe_ends_quietly(trained_run, tmp_path):
    """`loraclf evaluate RUN | head -1` ended with "error: Broken pipe" and exit 1 (a machine failure)."""
    script = ("import sys\nfrom loraclf.cli import main\n"
              f"sys.exit(main(['evaluate', {str(trained_run)!r}, '--precision', 'fp32']))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Broken pipe" not in err and "Traceback" not in err


def test_predict_into_a_pipe_closed_mid_output_is_not_a_success(trained_run, tmp_path):
    """`loraclf predict RUN --input big.txt | head` exited 0: the pipe took part of one large
    write and CPython dropped the rest without an error."""
    texts = tmp_path / "many.txt"
    # ~160 KB of JSON lines: more than a pipe holds
    texts.write_text("".join(f"the match goal number {i}\n" for i in range(600)))
    proc = subprocess.Popen([sys.executable, "-m", "loraclf.cli", "predict", str(trained_run), "--input", str(texts)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100)  # a reader that stops early (| head -c 100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_error_lines_name_the_command_not_an_override_value(capsys):
    """The command was taken as the first argument not starting with '-': an override before it
    named the error after its value ("loraclf 0: error")."""
    assert main(["--lora.r", "0", "params", "--config", SEED]) == 2
    assert _error_line(capsys).startswith("loraclf params: error: ")
    assert main(["--lora.r", "=", "params"]) == 2  # broken before the command is parsed: named all the same
    assert _error_line(capsys).startswith("loraclf params: error: ")


def test_a_requested_stop_of_training_is_not_reported_as_an_error(tiny_roberta, agnews_files, tmp_path, capsys,
                                                                   monkeypatch):
    # Ctrl-C during training printed "loraclf train: error: ... interrupted at step 1"
    import loraclf.train

    real = loraclf.train.train

    def stopped_at_once(cfg, callback=None, stop=None):
        stop.set()  # main()'s stop event, as its Ctrl-C / SIGTERM handler sets it
        return real(cfg, callback, stop)

    monkeypatch.setattr(loraclf.train, "train", stopped_at_once)
    argv = ["train", "--config", SEED, "--quiet"] + _args(tiny_overrides(tiny_roberta, agnews_files, tmp_path / "run"))
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "training N rows ..." line
    assert err.startswith("loraclf train: ") and "interrupted at step 1" in err and ": error:" not in err


def _edit_adapter_config(run, **changes):
    path = run / "adapter" / "adapter_config.json"
    settings = json.loads(path.read_text())
    settings.update(changes)
    path.write_text(json.dumps(settings))


@pytest.mark.parametrize("damage, needle", [
    (lambda run: (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA",'),
     "adapter settings are damaged"),  # a copy cut short: JSONDecodeError
    (lambda run: (run / "adapter" / "adapter_config.json").write_text("{}"), "adapter settings are damaged"),  # KeyError
    (lambda run: (run / "adapter" / "adapter_config.json").unlink(), "run is missing adapter/adapter_config.json"),
    (lambda run: _edit_adapter_config(run, r=7), "the adapter's settings do not match its weights"),  # size mismatch
    (lambda run: _edit_adapter_config(run, target_modules=["no_such_module"]),
     "the adapter's settings do not match its weights"),  # PEFT's NoMatchingPeftModuleError
    (lambda run: (run / "config.yaml").write_text("lora: ["), "config.yaml is not valid YAML"),  # ParserError
    (lambda run: (run / "config.yaml").write_text("- 1\n"), "config.yaml holds a list"),  # AttributeError
    (lambda run: (run / "run.json").write_text("[]"), "run.json is corrupted (a JSON list, not an object)"),
    (lambda run: (run / "labels.json").write_text("[]"), "labels.json is not a list of class names"),
    # two classes for a head trained on four: a size mismatch, or test rows blamed as "out of range"
    (lambda run: (run / "labels.json").write_text('["a", "b"]'), "labels.json lists a, b, run.json the run's classes"),
    (lambda run: (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()),
                                                           "label_names": [0, 1, 2, 3]})),
     "run.json the run's classes 0, 1, 2 and 1 more"),  # not strings: a TypeError in the message itself
])
def test_a_damaged_run_folder_is_one_error_line(trained_run, tmp_path, capsys, damage, needle):
    """Files of a run cut short by a copy, or edited, ended predict/evaluate/serve/--resume in a
    traceback (exit 1): JSONDecodeError, KeyError, yaml's ParserError, AttributeError, or PEFT's
    size mismatch deep in loading."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage(run)
    for command in (["predict", str(run), "a goal"], ["evaluate", str(run)]):
        assert main(command) == 2
        err = _error_line(capsys)
        assert needle in err, err
