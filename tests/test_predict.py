import json

import numpy as np
import pytest
import torch

from loraclf.errors import ConfigError, DataError, RunError
from loraclf.evaluate import classification_metrics, evaluate_run
from loraclf.predict import Predictor

TEXTS = ["Coach says the striker scored a goal", "Shares rise as the bank reports profit",
         "New chip for robot research", "Minister visits embassy after the election treaty", "goal"]


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.from_run(trained_run, batch_size=2, precision="fp32")


def test_batched_sorted_predictions_equal_one_at_a_time(predictor):
    together = predictor.logits(TEXTS)
    alone = np.concatenate([predictor.logits([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged(trained_run, predictor):
    unmerged = Predictor.from_run(trained_run, precision="fp32", merge=False)
    np.testing.assert_allclose(predictor.logits(TEXTS), unmerged.logits(TEXTS), rtol=1e-5, atol=1e-5)
    assert not any("lora" in n for n, _ in predictor.model.named_parameters())


@pytest.mark.parametrize("top_k", [0, -1, 2.5, None, True])
def test_predict_refuses_a_top_k_the_cli_refuses(predictor, top_k):
    # 0 and negatives returned one class; 2.5 and None were TypeErrors from deep inside
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        predictor.predict(TEXTS[:1], top_k=top_k)


def test_predict_output_shape(predictor):
    out = predictor.predict(TEXTS[:2], top_k=3)
    for r in out:
        assert set(r) == {"text", "label", "probabilities", "top_k"}
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert [t["label"] for t in r["top_k"]][0] == r["label"] and len(r["top_k"]) == 3
        probs = [t["probability"] for t in r["top_k"]]
        assert probs == sorted(probs, reverse=True)


def test_as_trained_computes_in_the_run_s_precision_unless_told(trained_run, monkeypatch):
    """Predictor.from_run(as_trained=True) took "auto" (the hardware's choice: bf16 on these CPUs)
    for a run trained in fp32, so its logits were not the ones the run's metrics came from."""
    import loraclf.precision

    monkeypatch.setattr(loraclf.precision, "cpu_has_native_bf16", lambda: True)  # auto would pick bf16
    assert json.loads((trained_run / "run.json").read_text())["precision"] == "fp32"
    assert Predictor.from_run(trained_run, as_trained=True).precision == "fp32"
    assert Predictor.from_run(trained_run).precision == "bf16"  # not as trained: the fastest
    assert Predictor.from_run(trained_run, as_trained=True, precision="auto").precision == "bf16"  # asked for


@pytest.mark.parametrize("texts, kind", [(b"bytes of a text", "bytes"), ({"a text": 1}, "a mapping"),
                                         ({"one", "two"}, "a set"), (frozenset({"one"}), "a set"),
                                         # a DataFrame iterates as its column names: "text" was classified
                                         (__import__("pandas").DataFrame({"text": TEXTS[:2]}), "a table")])
def test_texts_that_would_not_line_up_are_refused(predictor, texts, kind):
    # bytes were read as integers ("text 1 is not a string (int)"), a dict as its keys, a set in no fixed order
    with pytest.raises(DataError, match=f"texts are {kind}, not a string or a sequence of strings"):
        predictor.predict(texts)


def test_a_zero_dimensional_array_is_one_text(predictor):
    # np.array("text") cannot be iterated: a TypeError from deep inside
    np.testing.assert_array_equal(predictor.logits(np.array(TEXTS[0])), predictor.logits([TEXTS[0]]))


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "nonsense"}, "device 'nonsense' is not a device"),
    ({"device": "cuda:7"}, "device 'cuda:7' is not available"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"max_tokens": -5}, "max_tokens must be an integer >= 1")])
def test_predictor_arguments_are_checked_at_construction(trained_run, kwargs, match):
    # a RuntimeError or AssertionError from torch, or a ValueError at the first predict
    with pytest.raises(ConfigError, match=match):
        Predictor.from_run(trained_run, **kwargs)


def test_evaluating_on_a_file_of_texts_without_labels_says_what_it_needs(trained_run, tmp_path, capsys):
    # the fix was "set --data.text_columns to existing columns", naming the first text as a column
    from loraclf.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert main(["evaluate", str(trained_run), "--data.test", str(texts)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "texts without labels are for loraclf predict --input" in err
    assert "set --data.text_columns" not in err


def test_empty_text_rejected(predictor):
    with pytest.raises(DataError, match="text 2 is empty"):
        predictor.predict(["fine", "   "])


def test_bf16_predictions_agree_with_fp32(trained_run, predictor):
    bf16 = Predictor.from_run(trained_run, precision="bf16")
    assert bf16.precision == "bf16"
    # weights held in bf16 (no per-forward autocast of fp32 weights); logits come back float32
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    logits = bf16.logits(TEXTS)
    assert logits.dtype == np.float32
    assert (logits.argmax(-1) == predictor.logits(TEXTS).argmax(-1)).mean() >= 0.8
    np.testing.assert_allclose(logits, predictor.logits(TEXTS), atol=0.1)


def test_token_budget_batches_give_the_same_logits(trained_run, predictor, monkeypatch):
    import loraclf.predict

    budgeted = Predictor.from_run(trained_run, batch_size=64, precision="fp32", max_tokens=12)
    expected = predictor.logits(TEXTS)
    batches, cut = [], loraclf.predict.sorted_batches

    def spy(lengths, *args):
        out = cut(lengths, *args)
        batches.extend([lengths[i] for i in idx] for idx in out)
        return out

    monkeypatch.setattr(loraclf.predict, "sorted_batches", spy)
    np.testing.assert_allclose(budgeted.logits(TEXTS), expected, rtol=1e-5, atol=1e-5)
    # the budget cut the texts into several batches of at most 12 padded tokens (one row may pass it)
    assert len(batches) > 1 and sum(map(len, batches)) == len(TEXTS)
    assert all(len(b) * max(b) <= 12 or len(b) == 1 for b in batches)


def test_classification_metrics_against_hand_computed():
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_counts_only_the_classes_that_occur():
    # Two of four classes in the data, predicted perfectly: macro-F1 was 0.5 (absent classes as 0),
    # scikit-learn's and HF evaluate's default gives 1.0.
    m = classification_metrics(np.array([0, 0, 2, 2]), np.array([0, 0, 2, 2]), ["a", "b", "c", "d"])
    assert m["macro_f1"] == 1.0 and m["accuracy"] == 1.0
    assert m["per_class"]["b"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    # a class never in the data but predicted counts (its precision is 0)
    m = classification_metrics(np.array([0, 0, 2, 2]), np.array([0, 1, 2, 2]), ["a", "b", "c", "d"])
    assert m["per_class"]["b"]["precision"] == 0.0 and m["per_class"]["d"]["f1"] is None
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)


def test_evaluate_run_matches_training_test_metrics(trained_run, tmp_path):
    import shutil

    # a copy: evaluate writes eval/ into the run, and other modules' tests check the shared run
    # has none (run in another order, they failed)
    run = shutil.copytree(trained_run, tmp_path / "run")
    r = evaluate_run(run, precision="fp32")
    info = json.loads((run / "run.json").read_text())
    assert r["split"] == "test" and r["n"] == 80
    assert r["accuracy"] == pytest.approx(info["metrics"]["test"]["accuracy"])
    assert (run / "eval" / "test.csv.json").is_file()
    assert (run / "eval" / "test.csv_confusion.png").stat().st_size > 1000


def test_open_run_refuses_broken_runs(trained_run, tmp_path):
    import shutil

    with pytest.raises(RunError, match="no such run directory"):
        Predictor.from_run(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    (broken / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(RunError, match="missing adapter/adapter_model.safetensors"):
        Predictor.from_run(broken)
    (broken / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="corrupted"):
        Predictor.from_run(broken)


def test_library_call_pitfalls(trained_run, predictor):
    from loraclf.errors import ConfigError

    # a bare string is one text (as in transformers' pipelines), not a sequence of characters
    one = predictor.predict("goal match")
    assert len(one) == 1 and one[0]["text"] == "goal match"
    np.testing.assert_array_equal(predictor.logits("goal match"), predictor.logits(["goal match"]))
    assert Predictor.from_run(trained_run, device="cpu", precision="fp32").device == torch.device("cpu")
    from peft import PeftModel
    assert isinstance(Predictor.from_run(trained_run, merge=False, precision="fp32").model, PeftModel)  # README
    with pytest.raises(ConfigError, match="precision 'fp16' is not one of"):
        Predictor.from_run(trained_run, precision="fp16")
    # a NumPy array or a pandas Series of texts ("truth value of an array is ambiguous" before)
    import pandas as pd
    want = predictor.logits(TEXTS[:2])
    np.testing.assert_array_equal(predictor.logits(np.array(TEXTS[:2])), want)
    assert [r["label"] for r in predictor.predict(pd.Series(TEXTS[:2]))] == \
        [r["label"] for r in predictor.predict(TEXTS[:2])]
    with pytest.raises(DataError, match="text 2 is not a string \\(NoneType\\)"):
        predictor.predict(["ok", None])


def test_damaged_files_are_one_clear_error(trained_run, tmp_path):
    """A truncated adapter or checkpoint file (a copy cut short, a full disk elsewhere) names
    itself instead of ending in safetensors' traceback."""
    import shutil

    from loraclf import checkpoint
    from loraclf.errors import ModelError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    adapter = run / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:50])
    with pytest.raises(ModelError, match="adapter weights are damaged") as e:
        Predictor.from_run(run)
    assert str(adapter) in str(e.value)
    shutil.rmtree(run / "tokenizer")
    shutil.copytree(trained_run / "adapter", run / "adapter", dirs_exist_ok=True)
    with pytest.raises(ModelError, match="cannot load the run's tokenizer") as e:
        Predictor.from_run(run)
    assert str(run / "tokenizer") in str(e.value)
    ckpt = checkpoint.latest(trained_run)
    damaged = tmp_path / "ckpt"
    shutil.copytree(ckpt, damaged)
    (damaged / "trainable.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(RunError, match="checkpoint file is damaged") as e:
        checkpoint.load(damaged)
    assert f"delete {damaged}" in str(e.value)


def test_texts_are_stripped_as_in_training(predictor):
    """Arguments, .txt lines, stdin and the API were tokenized as given: around a text, spaces are
    tokens of their own to a byte-level BPE tokenizer, ones the model never saw (training strips)."""
    plain, padded = predictor.predict(["Shares bank profit", "  Shares bank profit \t"])
    assert padded["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-6)
    assert padded["text"] == "  Shares bank profit \t"  # the output still names the text as given


def test_evaluate_reproduces_the_run_s_metrics_by_default_with_the_loss(trained_run, tmp_path, monkeypatch):
    """evaluate ran in bf16 by default on CPUs with AMX, not reproducing run.json (trained in
    fp32), and reported no loss."""
    import shutil

    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval", ignore_errors=True)
    info = json.loads((run / "run.json").read_text())
    r = evaluate_run(run)
    assert r["precision"] == info["precision"] == "fp32"
    assert r["accuracy"] == info["metrics"]["test"]["accuracy"]
    assert r["loss"] == info["metrics"]["test"]["loss"]  # computed as training evaluated: exactly
    # other precision or other columns: their own files, saying how; the run's own evaluation stays
    other = evaluate_run(run, precision="bf16")
    assert other["saved_to"].endswith("eval/test.csv.bf16.json")
    monkeypatch.chdir(run.parent)  # a run given relative to the working directory: saved_to was relative too
    assert evaluate_run("run")["saved_to"] == str(run / "eval" / "test.csv.json")
    title = evaluate_run(run, {"text_columns": ["title"]})
    assert title["read_as"] == {"text_columns": ["title"]}
    assert title["saved_to"].endswith("eval/test.csv.text_columns-title.json")
    assert json.loads((run / "eval" / "test.csv.json").read_text())["accuracy"] == r["accuracy"]


def test_a_config_edited_after_training_is_refused_not_loaded_into_another_model(trained_run, tmp_path):
    """head linear -> mean loaded the linear head's weights into a mean-pooling head (exit 0,
    other probabilities); lora.r or a lowrank head were tracebacks. Resume refused the same edit."""
    import shutil

    import yaml

    run = shutil.copytree(trained_run, tmp_path / "run")
    conf = yaml.safe_load((run / "config.yaml").read_text())
    conf["lora"]["r"] += 2
    (run / "config.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(RunError, match=r"config.yaml differs from the recipe the run was trained with: lora.r"):
        Predictor.from_run(run)


def test_checkpoint_without_its_best_weights_is_refused(trained_run, tmp_path):
    """--checkpoint on a checkpoint whose best.safetensors was lost (a partial copy) evaluated the
    current weights, naming the checkpoint as if its best weights had been used."""
    import shutil

    run = shutil.copytree(trained_run, tmp_path / "run")
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    (newest / "best.safetensors").unlink()
    with pytest.raises(RunError, match=rf"the newest checkpoint \({newest.name}\) is damaged or lacks a file"):
        Predictor.from_run(run, from_checkpoint=True)
