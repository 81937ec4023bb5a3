import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from loraclf import checkpoint, runs
from loraclf.config import load_config
from loraclf.errors import BudgetError, ModelError, RunError
from loraclf.runs import open_run
from loraclf.train import train

SEED = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"


def test_run_directory_is_complete_and_honest(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"run.json", "config.yaml", "labels.json", "metrics.jsonl", "learning_curve.png", "adapter",
            "tokenizer"} <= names
    assert {p.name for p in (trained_run / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    info = json.loads((trained_run / "run.json").read_text())
    assert info["status"] == "complete"
    assert set(info["versions"]) >= {"python", "torch", "transformers", "peft"}
    assert info["data"]["train"]["sha256"] and info["data"]["test"]["sha256"] and info["seed"] == 42
    # what config.yaml's automatic choices resolved to, and the threads: what rerunning it elsewhere needs
    assert info["precision"] == "fp32" and info["fused_accumulation"] is False and info["device"] == "cpu"
    assert info["torch_threads"] == torch.get_num_threads() >= 1
    records = [json.loads(l) for l in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["split"] in ("train", "validation", "test") for r in records)
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["split"] for r in evals] == ["validation"] * 12 + ["test"]
    best = max((r for r in evals if r["split"] == "validation"), key=lambda r: r["accuracy"])
    assert info["best_epoch"] == evals[-1]["epoch"] == min(
        r["epoch"] for r in evals if r["split"] == "validation" and r["accuracy"] == best["accuracy"])
    assert info["metrics"]["validation"]["accuracy"] == best["accuracy"]
    assert info["metrics"]["test"]["accuracy"] == evals[-1]["accuracy"]
    assert evals[-1]["step"] == best["step"]  # the weights evaluated: the best epoch's (it said the last step)
    # the tiny model learns the synthetic task: far above chance (0.25)
    assert info["metrics"]["test"]["accuracy"] > 0.4
    run = open_run(trained_run)
    assert run.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert Path(run.cfg.model.name_or_path).is_absolute()


def test_same_seed_same_adapter_bit_for_bit(tiny_roberta, agnews_files, tmp_path):
    weights = []
    for name in ("a", "b"):
        cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / name,
                                               **{"data.max_train_samples": 64, "train.epochs": 1}))
        train(cfg)
        weights.append(load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


def test_gradient_accumulation_and_bert(tiny_bert, agnews_files, tmp_path):
    cfg = load_config(SEED, tiny_overrides(tiny_bert, agnews_files, tmp_path / "r",
                                           **{"train.gradient_accumulation_steps": 2, "train.epochs": 1,
                                              "data.max_train_samples": 40}))
    result = train(cfg)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["optimizer_steps"] == 2  # 40 rows / 16 = 3 micro-batches -> ceil(3 / 2)
    # against the adapter written (every trainable tensor, LoRA and head), not against the count
    # both figures above come from
    from safetensors.torch import load_file as load

    saved = sum(t.numel() for t in load(tmp_path / "r" / "adapter" / "adapter_model.safetensors").values())
    assert result.trainable_params == info["params"]["trainable"] == saved


def test_over_budget_writes_nothing(tiny_roberta, agnews_files, tmp_path):
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r",
                                           **{"train.max_trainable_params": 100}))
    with pytest.raises(BudgetError):
        train(cfg)
    assert not (tmp_path / "r").exists()


def test_existing_run_is_not_clobbered(trained_run, tiny_roberta, agnews_files):
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, trained_run))
    with pytest.raises(RunError, match="already exists"):
        train(cfg)


def test_failed_run_is_marked_and_refused(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    import loraclf.train as t

    def boom(*a, **k):
        raise RuntimeError("simulated crash during evaluation")

    monkeypatch.setattr(t, "_evaluate", boom)
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r", **{"train.epochs": 1}))
    with pytest.raises(RuntimeError):
        train(cfg)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["status"] == "failed" and "simulated crash" in info["error"]
    with pytest.raises(RunError, match="incomplete"):
        open_run(tmp_path / "r")


class _PlannedSteps:
    """A training callback that keeps the optimizer steps the schedule was planned for."""

    total: int | None = None

    def on_start(self, total, info): self.total = total
    def on_step(self, step, record): pass
    def on_eval(self, record): pass


def test_token_budget_batches_train_and_plan_the_schedule_on_them(tiny_roberta, agnews_files, tmp_path):
    """The schedule's length is the sum of each epoch's token-budget batches, which differ from
    one epoch to the next (not epoch 1's count times the epochs)."""
    import random

    from conftest import make_rows, write_agnews_csv
    from loraclf.data import LengthGroupedBatchSampler, load_splits, tokenize
    from loraclf.model import load_tokenizer

    rng = random.Random(0)  # a quarter of the texts four times as long: batch counts vary by epoch
    rows = [(c, t, " ".join([d] * rng.choice([1, 1, 1, 4]))) for c, t, d in make_rows(240, seed=2)]
    files = {**agnews_files, "train": write_agnews_csv(tmp_path / "train.csv", rows)}
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, files, tmp_path / "r", **{
        "train.max_tokens_per_batch": 200, "train.epochs": 3, "train.group_by_length": False,
        "data.max_train_samples": 64}))
    planned = _PlannedSteps()
    train(cfg, planned)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    ids = tokenize(load_splits(cfg.data).train.texts, load_tokenizer(cfg.model), cfg.data.max_length)
    s = LengthGroupedBatchSampler([len(x) for x in ids], 16, cfg.train.seed, group_by_length=False, max_tokens=200)
    counts = [s.batches_in_epoch(e) for e in (1, 2, 3)]
    assert len(set(counts)) > 1  # (what tells the two ways of counting apart)
    assert planned.total == info["optimizer_steps"] == sum(counts) > 3 * 64 // 16


def test_token_budget_holds_for_batches_padded_to_a_multiple(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """The budget counted rows x longest row; padding to a multiple of 64 then made 16-row
    batches of 1,024 tokens out of a 256-token budget."""
    from loraclf.data import PadCollator

    shapes, call = [], PadCollator.__call__

    def spy(self, items):
        batch = call(self, items)
        if self.multiple == 64:  # the training batches (evaluation pads to no multiple)
            shapes.append(tuple(batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(PadCollator, "__call__", spy)
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r",
                                           **{"train.max_tokens_per_batch": 256, "data.pad_to_multiple_of": 64,
                                              "train.epochs": 1, "data.max_train_samples": 64}))
    train(cfg)
    assert shapes and all(rows * width <= 256 for rows, width in shapes), shapes
    assert sum(rows for rows, _ in shapes) == 64


def test_a_token_budget_below_the_longest_row_is_refused(tiny_roberta, agnews_files, tmp_path):
    """It trained one row per batch, every batch over the budget, without a word."""
    from loraclf.errors import ConfigError

    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r",
                                           **{"train.max_tokens_per_batch": 10, "data.pad_to_multiple_of": 8}))
    with pytest.raises(ConfigError, match=r"train.max_tokens_per_batch: 10 is below the longest training row "
                                          r"\((\d+) tokens, padded\) — fix: set it to at least \1") as e:
        train(cfg)
    widest = int(re.search(r"\((\d+) tokens", str(e.value)).group(1))
    assert widest % 8 == 0
    # found after the run folder was written: it was left with a "failed" run.json, so the corrected
    # command was refused ("already exists") and --resume had no checkpoint; now it is as it was
    assert not [p.name for p in (tmp_path / "r").iterdir() if p.name != runs.LOCK_FILE]
    cfg.train.max_tokens_per_batch = widest
    train(cfg)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "complete"


def test_recipe_options_reach_the_loop(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """Warm-up, the cosine schedule, clipping, weight decay and label smoothing each changed
    nothing a test looked at when ignored: every loop test compares two runs ignoring it alike."""
    import math

    import accelerate

    import loraclf.train as train_module

    seen = {"clip": [], "smoothing": set(), "decay": None}
    real_clip, real_loss, real_opt = accelerate.Accelerator.clip_grad_norm_, train_module.training_loss, \
        train_module.build_optimizer

    def clip(self, params, max_norm, *a, **k):
        seen["clip"].append(max_norm)
        return real_clip(self, params, max_norm, *a, **k)

    def loss(logits, labels, smoothing=0.0):
        seen["smoothing"].add(smoothing)
        return real_loss(logits, labels, smoothing)

    def optimizer(*a, **k):
        opt = real_opt(*a, **k)
        seen["decay"] = {g["weight_decay"] for g in opt.param_groups}
        return opt

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", clip)
    monkeypatch.setattr(train_module, "training_loss", loss)
    monkeypatch.setattr(train_module, "build_optimizer", optimizer)
    out, planned = tmp_path / "r", _PlannedSteps()
    train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, out, **{
        "train.epochs": 2, "train.warmup_ratio": 0.25, "train.scheduler": "cosine", "train.max_grad_norm": 0.5,
        "train.weight_decay": 0.1, "train.label_smoothing": 0.1, "train.log_every_steps": 1,
        "train.learning_rate": 1e-2})), planned)
    info = json.loads((out / "run.json").read_text())
    total = info["optimizer_steps"]
    assert planned.total == total and seen["clip"] == [0.5] * total
    assert seen["smoothing"] == {0.1} and seen["decay"] == {0.1}
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["event"] == "train"}
    warm = math.ceil(0.25 * total)
    want = {s: 1e-2 * (s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
            for s in range(1, total + 1)}
    assert lrs == pytest.approx(want, abs=1e-9) and lrs[total] == pytest.approx(0.0, abs=1e-12)


def _without_dropout(model: Path, dest: Path) -> Path:
    """A copy of a tiny model with dropout off: runs that draw dropout masks differently (one
    batch instead of two, compiled kernels) then compute the same thing."""
    import shutil

    shutil.copytree(model, dest)
    conf = json.loads((dest / "config.json").read_text())
    conf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dest / "config.json").write_text(json.dumps(conf))
    return dest


def _spy_compile(monkeypatch) -> list[tuple[str, bool]]:
    """(class name, dynamic) of every module compiled from now on, compiled as usual."""
    import torch

    calls, compile_ = [], torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        calls.append((type(self).__name__, kwargs.get("dynamic")))
        return compile_(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    return calls


def test_compiled_training_matches_eager(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    import torch

    # compiled kernels draw dropout masks with their own generator: compare without dropout
    model = _without_dropout(tiny_roberta, tmp_path / "no-dropout")
    weights, compiled = {}, _spy_compile(monkeypatch)
    for comp in (False, True):
        cfg = load_config(SEED, tiny_overrides(model, agnews_files, tmp_path / str(comp),
                                               **{"train.compile": comp, "train.epochs": 1, "lora.dropout": 0.0,
                                                  "data.max_train_samples": 48}))
        compiled.clear()
        train(cfg)
        # each of the 4 blocks compiled, with dynamic shapes (every length-grouped batch has its own)
        assert compiled == ([("RobertaLayer", True)] * 4 if comp else [])
        weights[comp] = load_file(tmp_path / str(comp) / "adapter" / "adapter_model.safetensors")
    # the same parameter names (no "_orig_mod."), so the adapter loads like an eager run's
    assert weights[True].keys() == weights[False].keys()
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-4, rtol=1e-3)
    from loraclf.predict import Predictor

    texts = ["goal for the striker", "bank profit rises"]
    np_logits = [Predictor.from_run(tmp_path / str(c), precision="fp32").logits(texts) for c in (False, True)]
    torch.testing.assert_close(torch.from_numpy(np_logits[1]), torch.from_numpy(np_logits[0]), atol=1e-4, rtol=1e-3)
    # training moved the adapter: the comparison is not between two untouched initialisations
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights[True].items() if "lora_B" in k)


@pytest.mark.parametrize("batches,expected_steps", [
    ({"train.group_by_length": False}, 6),
    ({}, 6),  # length-grouped (the default): the micro-batches were grouped on their own, not per step
    ({"train.max_tokens_per_batch": 150, "train.gradient_accumulation_steps": 3}, None),
], ids=["plain", "grouped", "token-budget"])
def test_fused_accumulation_trains_the_same_adapter(batches, expected_steps, tiny_roberta, agnews_files, tmp_path):
    import torch

    # Without dropout, two micro-batches of 16 rows and one batch of 32 are the same rows and the
    # same mean loss: the adapters must agree. 80 rows: each epoch ends on a step of one
    # micro-batch (16 rows), whose gradient the unfused run scaled down by half (accelerate
    # divides by gradient_accumulation_steps). Under a token budget the steps hold varying rows,
    # a multiple of the micro-batches per step but for a short last one (79 rows, 3 per step).
    model = _without_dropout(tiny_roberta, tmp_path / "no-dropout")
    weights, steps = {}, {}
    for fused in (False, True):
        cfg = load_config(SEED, tiny_overrides(model, agnews_files, tmp_path / str(fused),
                                               **{"train.fuse_accumulation": fused, "train.epochs": 2,
                                                  "train.gradient_accumulation_steps": 2, "lora.dropout": 0.0,
                                                  "data.max_train_samples": 79 if expected_steps is None else 80,
                                                  "train.max_grad_norm": None, **batches}))
        train(cfg)
        weights[fused] = load_file(tmp_path / str(fused) / "adapter" / "adapter_model.safetensors")
        steps[fused] = json.loads((tmp_path / str(fused) / "run.json").read_text())["optimizer_steps"]
        assert checkpoint.load(checkpoint.latest(tmp_path / str(fused))).loop.fused is fused
    assert steps[True] == steps[False] == (expected_steps or steps[True]) and steps[True] >= 4
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-5, rtol=1e-4)


def test_fused_accumulation_keeps_the_token_budget_of_a_step(tiny_roberta, agnews_files, tmp_path):
    """max_tokens_per_batch is per micro-batch: a fused step of gradient_accumulation_steps of
    them gets that many times the budget. It got one micro-batch's, so the fused run took about
    gradient_accumulation_steps times as many optimizer steps, each on that fraction of the rows."""
    steps = {}
    for fused in (False, True):
        out = tmp_path / str(fused)
        train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, out,
                                               **{"train.fuse_accumulation": fused, "train.epochs": 1,
                                                  "train.gradient_accumulation_steps": 4,
                                                  "train.max_tokens_per_batch": 150,
                                                  "data.max_train_samples": 96})))
        steps[fused] = json.loads((out / "run.json").read_text())["optimizer_steps"]
    # one micro-batch's budget per fused step gave about 4x the steps; both cut the same step groups
    assert steps[False] >= 3 and steps[True] == steps[False]


def test_padding_to_a_multiple_trains_the_same_adapter(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    import torch

    # Extra padding is masked out: without dropout, rounding batch widths up to a multiple of 16
    # must give the adapter of a run padded to each batch's longest row, and the same counts.
    from loraclf.data import PadCollator

    model = _without_dropout(tiny_roberta, tmp_path / "no-dropout")
    weights, runs_, widths = {}, {}, {}
    collate = PadCollator.__call__
    for multiple in (None, 16):
        out = tmp_path / str(multiple)
        seen = widths[multiple] = []  # (the collator's multiple, the batch's width)

        def spy(self, items, seen=seen):
            batch = collate(self, items)
            seen.append((self.multiple, batch["input_ids"].shape[1]))
            return batch

        monkeypatch.setattr(PadCollator, "__call__", spy)
        train(load_config(SEED, tiny_overrides(model, agnews_files, out,
                                               **{"data.pad_to_multiple_of": multiple, "train.epochs": 1,
                                                  "lora.dropout": 0.0, "data.max_train_samples": 64})))
        weights[multiple] = load_file(out / "adapter" / "adapter_model.safetensors")
        runs_[multiple] = json.loads((out / "run.json").read_text())
    assert runs_[16]["optimizer_steps"] == runs_[None]["optimizer_steps"]
    # the training batches really were rounded up (evaluation's are not: the option is for training),
    # and the plain run's were not: the comparison means something
    rounded = [w for m, w in widths[16] if m == 16]
    assert rounded and all(w % 16 == 0 for w in rounded) and {m for m, _ in widths[None]} == {None}
    assert any(w % 16 for _, w in widths[None])
    # real tokens are counted on the host, padding excluded
    assert runs_[16]["throughput"]["train_tokens_per_s"] * runs_[16]["throughput"]["train_seconds"] == \
        pytest.approx(runs_[None]["throughput"]["train_tokens_per_s"] * runs_[None]["throughput"]["train_seconds"])
    for k in weights[16]:
        torch.testing.assert_close(weights[16][k], weights[None][k], atol=1e-5, rtol=1e-4)


def test_fuse_accumulation_defaults_to_off_on_a_cpu(tiny_roberta, agnews_files, tmp_path):
    import torch

    # null means "on a GPU only": on this CPU the default run must be the unfused run, bit for bit
    assert load_config(SEED).train.fuse_accumulation is None
    weights = {}
    for fused in (None, False):
        out = tmp_path / str(fused)
        train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, out,
                                               **{"train.fuse_accumulation": fused, "train.epochs": 1,
                                                  "train.gradient_accumulation_steps": 2,
                                                  "data.max_train_samples": 64})))
        weights[fused] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(weights[None][k], weights[False][k]) for k in weights[False])


def _long_rows(n: int) -> list:
    from conftest import make_rows
    # every row far past the tiny models' 128 positions
    return [(c, t, " ".join([d] * 30)) for c, t, d in make_rows(n, seed=5)]


def test_lengths_stop_at_the_position_table(tiny_roberta, tiny_bert, agnews_files, tmp_path):
    """Texts longer than the model holds: truncation and batch rounding must stop at its
    position table even when the tokenizer does not say how long it may be (it crashed inside
    the forward with an index error) or when padding to a multiple would pass it."""
    import shutil
    from conftest import write_agnews_csv
    from loraclf.predict import Predictor

    files = {"train": write_agnews_csv(tmp_path / "long.csv", _long_rows(48)),
             "test": write_agnews_csv(tmp_path / "long_test.csv", _long_rows(8))}
    nolimit = tmp_path / "nolimit"
    shutil.copytree(tiny_roberta, nolimit)
    tc = json.loads((nolimit / "tokenizer_config.json").read_text())
    tc.pop("model_max_length")
    (nolimit / "tokenizer_config.json").write_text(json.dumps(tc))
    for model, extra in ((nolimit, {}), (tiny_bert, {"data.pad_to_multiple_of": 48})):
        out = tmp_path / "runs" / model.name
        train(load_config(SEED, tiny_overrides(model, files, out, **{"train.epochs": 1, **extra})))
        assert json.loads((out / "run.json").read_text())["status"] == "complete"
        predictor = Predictor.from_run(out)
        assert predictor.max_length == 128  # roberta: 130 positions less pad id + 1; bert: 128
        assert max(len(x) for x in predictor.encode(["word " * 400])) == 128


def test_usable_length_follows_the_position_table(roberta_base_arch, tiny_bert):
    from transformers import AutoConfig
    from loraclf.model import usable_length

    assert usable_length(512, AutoConfig.from_pretrained(roberta_base_arch)) == 512  # 514 - (pad 1 + 1)
    assert usable_length(600, AutoConfig.from_pretrained(roberta_base_arch)) == 512
    assert usable_length(64, AutoConfig.from_pretrained(tiny_bert)) == 64
    assert usable_length(512, AutoConfig.from_pretrained(tiny_bert)) == 128
    assert usable_length(512, None) == 512


@pytest.mark.parametrize("damage,expected", [
    # transformers 5 loads such a folder as special tokens only; transformers 4 fails to load it
    ("no_tokenizer", "(no vocabulary beyond its 5 special tokens|has no vocabulary files) \\(tokenizer files missing"),
    ("no_weights", "no *.safetensors weights"),
    ("truncated_weights", "weights file is damaged"),
])
def test_broken_model_folder_fails_before_the_run_folder(tiny_roberta, agnews_files, tmp_path, damage, expected):
    """A model folder without tokenizer files trained to chance and called itself complete; one
    without (readable) weights failed only after writing the run folder, which then blocked a rerun."""
    import shutil

    from loraclf.errors import ModelError

    model = tmp_path / "model"
    shutil.copytree(tiny_roberta, model)
    if damage == "no_tokenizer":
        for f in model.glob("tokenizer*"):
            f.unlink()
    elif damage == "no_weights":
        (model / "model.safetensors").unlink()
    else:
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    out = tmp_path / "run"
    with pytest.raises(ModelError, match=expected if damage == "no_tokenizer" else re.escape(expected)):
        train(load_config(SEED, tiny_overrides(model, agnews_files, out, **{"train.epochs": 1})))
    assert not out.exists()


def test_a_hub_base_is_pinned_to_the_commit_it_trained_on(tiny_roberta, agnews_files, tmp_path):
    """A run of a hub model records the commit it trained on as model.revision (and in the
    adapter's config, for PEFT's own loaders): when the repository's main moves to other
    weights, the run still loads (and predicts with) its own."""
    import shutil

    from safetensors.torch import save_file

    from conftest import hub_snapshot
    from loraclf.predict import Predictor

    repo, first, second = f"acme/{tmp_path.name}", "1" * 40, "2" * 40  # a repo of this test's own
    cached = hub_snapshot(repo, tiny_roberta, first)
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, run,
                                               **{"model.name_or_path": repo, "train.epochs": 1})))
    # saving the adapter asks nothing of the hub (PEFT's embedding check did, warning offline)
    assert not [w for w in caught if "config file" in str(w.message)]
    saved = open_run(run).cfg.model
    assert (saved.name_or_path, saved.revision) == (repo, first)
    assert json.loads((run / "run.json").read_text())["recipe"]["model"]["revision"] == first
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["revision"] == first
    texts = ["shares of the bank rose", "the striker scored a goal"]
    before = Predictor.from_run(run, precision="fp32").logits(texts)

    moved = tmp_path / "moved"  # the repository moves on: main now holds other weights
    shutil.copytree(tiny_roberta, moved)
    weights = load_file(moved / "model.safetensors")
    save_file({k: v + 0.5 for k, v in weights.items()}, moved / "model.safetensors", metadata={"format": "pt"})
    hub_snapshot(repo, moved, second)
    assert (cached / "refs" / "main").read_text() == second
    assert torch.equal(torch.as_tensor(Predictor.from_run(run, precision="fp32").logits(texts)), torch.as_tensor(before))
    # offline with only the newer commit cached, the run says which commit it needs
    shutil.rmtree(cached / "snapshots" / first)
    with pytest.raises(ModelError, match=f"cannot load model config '{repo}' at revision {first}: not a local"):
        Predictor.from_run(run, precision="fp32")

    assert "base_model_files" not in json.loads((run / "run.json").read_text())  # the commit pins it

    local = tmp_path / "local"  # a local folder has no commit: its files are fingerprinted instead
    train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, local, **{"train.epochs": 1})))
    assert open_run(local).cfg.model.revision is None
    assert "base_model_files" in json.loads((local / "run.json").read_text())


def test_a_changed_local_base_is_refused(tiny_roberta, agnews_files, tmp_path):
    """A run trained on a local base folder records its files; when they change (other weights
    saved there), evaluate, predict, serve and --resume refuse instead of applying the adapter to
    other weights. A touched or copied folder with the same content is the same base."""
    import hashlib
    import os
    import shutil

    import numpy as np
    from safetensors.torch import save_file

    from loraclf.cli import main as cli
    from loraclf.predict import Predictor
    from loraclf.train import resume

    base = tmp_path / "base"
    shutil.copytree(tiny_roberta, base)
    run = tmp_path / "run"
    train(load_config(SEED, tiny_overrides(base, agnews_files, run, **{"train.epochs": 1,
                                                                       "train.checkpoint_every_steps": 2})))
    files = json.loads((run / "run.json").read_text())["base_model_files"]
    assert set(files) == {"config.json", "model.safetensors"}  # the tokenizer: the run keeps its own copy
    weights = base / "model.safetensors"
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert files["model.safetensors"]["bytes"] == weights.stat().st_size
    texts = ["shares of the bank rose", "the striker scored a goal"]
    before = Predictor.from_run(run, precision="fp32").logits(texts)

    os.utime(weights, ns=(1, 1))  # touched, same content: hashed again, and the same
    elsewhere = tmp_path / "elsewhere"  # copied and pointed at: compared by content
    shutil.copytree(base, elsewhere)
    cfg_file = run / "config.yaml"
    original = cfg_file.read_text()
    cfg_file.write_text(original.replace(str(base), str(elsewhere)))
    assert str(elsewhere) in cfg_file.read_text()
    assert np.array_equal(Predictor.from_run(run, precision="fp32").logits(texts), before)
    cfg_file.write_text(original)

    # other weights of the same size saved over the file
    save_file({k: v + 0.5 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == files["model.safetensors"]["bytes"]
    with pytest.raises(ModelError, match=r"base model differs from the one the run trained on "
                                         r"\(model.safetensors changed since\).*restore the base model"):
        Predictor.from_run(run, precision="fp32")
    assert cli(["predict", str(run), "goal"]) == 2
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    with pytest.raises(ModelError, match="base model differs"):
        resume(run)
    (run / "run.json").write_text(json.dumps(info))

    shutil.copy(elsewhere / "model.safetensors", weights)  # the original back
    # what loading does not read may come and go: a Trainer's file, PyTorch weights, a shard index
    # beside model.safetensors (transformers loads model.safetensors then)
    for name in ("training_args.bin", "pytorch_model.bin", "model.safetensors.index.json"):
        (base / name).write_bytes(b"{}")
    assert np.array_equal(Predictor.from_run(run, precision="fp32").logits(texts), before)


def test_a_sharded_local_base_is_fingerprinted_by_its_index(tmp_path):
    """Without model.safetensors, transformers reads the index and the shards its weight_map
    names, whatever they are called: those are what a run records and compares."""
    from loraclf.config import ModelConfig
    from loraclf.model import base_changes, base_fingerprint

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "weights-1.safetensors").write_bytes(b"one")
    (base / "weights-2.safetensors").write_bytes(b"two")
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "weights-1.safetensors", "b": "weights-2.safetensors", "c": "weights-1.safetensors"}}))
    (base / "pytorch_model.bin").write_bytes(b"not read")
    mcfg = ModelConfig(name_or_path=str(base))
    recorded = base_fingerprint(mcfg)
    assert set(recorded) == {"config.json", "model.safetensors.index.json", "weights-1.safetensors",
                             "weights-2.safetensors"}
    assert base_changes(mcfg, recorded) == []
    (base / "weights-2.safetensors").write_bytes(b"TWO")  # same size, other content
    assert base_changes(mcfg, recorded) == ["weights-2.safetensors"]
    # with trust_remote_code the model's code is part of the base
    (base / "modeling_x.py").write_text("x = 1")
    coded = ModelConfig(name_or_path=str(base), trust_remote_code=True)
    assert "modeling_x.py" in base_fingerprint(coded) and "modeling_x.py" not in recorded


def test_relative_data_paths_are_saved_absolute(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """Trained with data paths relative to one folder, the run evaluates from any other: the
    saved config holds absolute paths, as it does for the model."""
    import shutil

    from loraclf.errors import DataError
    from loraclf.evaluate import evaluate_run

    work = tmp_path / "work"
    work.mkdir()
    for f in agnews_files.values():
        shutil.copy(f, work / f.name)
    monkeypatch.chdir(work)
    files = {k: Path(v.name) for k, v in agnews_files.items()}  # relative names
    train(load_config(SEED, tiny_overrides(tiny_roberta, files, Path("run"), **{"train.epochs": 1})))
    monkeypatch.chdir(tmp_path)
    saved = open_run(work / "run").cfg.data
    assert (saved.train, saved.test) == (str(work / files["train"]), str(work / files["test"]))
    assert evaluate_run(work / "run", precision="fp32", write=False)["n"] == 80
    (work / files["test"]).unlink()
    with pytest.raises(DataError, match="data.test in the run's config.yaml, or pass --data.test PATH"):
        evaluate_run(work / "run", precision="fp32", write=False)


def test_best_epoch_weights_are_saved_and_tested(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """Validation peaking in epoch 2 of 3, tied in epoch 3: the adapter, the test metrics and
    run.json are epoch 2's (the first of a tie), not the last epoch's (forced, so that it holds
    whatever numbers a torch release gives)."""
    import loraclf.train as train_module
    from loraclf.evaluate import evaluate_run

    real, calls = train_module._evaluate, []

    def peaking(model, ids, labels, *rest):
        out = real(model, ids, labels, *rest)
        calls.append(len(calls))
        return {**out, "accuracy": [0.5, 0.9, 0.9][calls[-1]]} if len(calls) <= 3 else out

    monkeypatch.setattr(train_module, "_evaluate", peaking)
    out = tmp_path / "r"
    train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, out, **{"train.epochs": 3})))
    info = json.loads((out / "run.json").read_text())
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "validation"]
    test = next(r for r in records if r.get("split") == "test")
    assert info["best_epoch"] == 2 and info["metrics"]["validation"]["accuracy"] == 0.9
    assert (test["epoch"], test["step"]) == (2, val[1]["step"]) and val[1]["step"] < val[-1]["step"]
    last = checkpoint.load(checkpoint.latest(out))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    # PEFT saves without the adapter's name and its copy of the head: "lora_A.default.weight" -> "lora_A.weight"
    named = {k.replace(".default", "").replace(".modules_to_save", ""): v for k, v in last.best.items()}
    assert named.keys() == adapter.keys()
    assert all(torch.equal(named[k], adapter[k]) for k in adapter)
    assert not all(torch.equal(last.trainable[k], last.best[k]) for k in last.best)
    # and the test metrics are of those weights: the saved adapter reproduces them
    assert evaluate_run(out, write=False)["loss"] == info["metrics"]["test"]["loss"]


def test_training_leaves_every_base_weight_untouched(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """The model test checks one optimizer step by hand; this checks what train() itself does
    (a weight made trainable after build_model, e.g. a LayerNorm, was caught only by chance)."""
    import loraclf.train as train_module

    built = []
    real = train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r", **{"train.epochs": 1}))
    train(cfg)
    from transformers import set_seed

    from loraclf.model import load_model_config

    set_seed(cfg.train.seed)  # as train() does: the frozen copy of the model's own head is drawn alike
    fresh = real(cfg.model, cfg.lora, load_model_config(cfg.model, ["World", "Sports", "Business", "Sci/Tech"]))
    trained = dict(built[-1].named_parameters())
    # base weights chosen by name, not by requires_grad: everything but LoRA and the head's trained copy
    base = [n for n, _ in fresh.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    assert len(base) > 10 and [n for n in base if not torch.equal(trained[n], fresh.get_parameter(n))] == []
    assert any(not torch.equal(trained[n], p) for n, p in fresh.named_parameters() if "lora_B" in n)


def test_a_notebook_s_earlier_accelerator_and_seeds_neither_change_training_nor_are_changed(
        tiny_roberta, agnews_files, tmp_path):
    """In one long-lived process (a notebook): an Accelerator made earlier for bf16 (a
    Trainer(bf16=True) cell) wrapped training's forward in bf16 autocast while run.json said fp32,
    and training's Accelerator then stopped the caller from making their own; training also left
    the caller's random generators reseeded (every run's next draw the same)."""
    import random

    import numpy as np
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def run(name):
        out = tmp_path / name
        train(load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, out,
                                               **{"train.epochs": 1, "data.max_train_samples": 48})))
        return load_file(out / "adapter" / "adapter_model.safetensors")

    plain = run("plain")
    AcceleratorState._reset_state()
    theirs = Accelerator(mixed_precision="bf16", cpu=True)
    random.seed(999), np.random.seed(999), torch.manual_seed(999)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(999), np.random.seed(999), torch.manual_seed(999)
    beside = run("beside")
    assert all(torch.equal(plain[k], beside[k]) for k in plain)  # fp32, as recorded
    assert theirs.state.mixed_precision == "bf16" and theirs.mixed_precision == "bf16"  # theirs, as it was
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    AcceleratorState._reset_state()
    run("after")
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"  # not "already initialized"
    AcceleratorState._reset_state()


def test_train_given_a_path_instead_of_a_config_says_so(tmp_path):
    # train("recipe.yaml") failed with AttributeError: 'str' object has no attribute 'train'
    with pytest.raises(TypeError, match=r"train\(\) takes a loraclf.config.Config, not str"):
        train(str(tmp_path / "recipe.yaml"))
    assert not any(tmp_path.iterdir())
