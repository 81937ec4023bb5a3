"""loraclf plan: counts equal the built model's, across architectures; ranking; written configs
train as they are; the CLI end to end; every configs/*.yaml validates and fits its budget."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from loraclf import budget
from loraclf import plan as planner
from loraclf.cli import main
from loraclf.config import load_config

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _base(model_dir: Path, **extra):
    return load_config(None, {"model.name_or_path": str(model_dir), "data.label_names": LABELS, **extra})


def _sample(plans: list, k: int, seed: int = 0) -> list:
    """The best few, plus a spread of the rest that covers rank patterns, exclusions and layer subsets."""
    rng = random.Random(seed)
    rest = plans[3:]
    picked = plans[:3] + rng.sample(rest, min(k, len(rest)))
    for want in (lambda p: p.ffn_rank is not None, lambda p: p.role_set == "ffn",
                 lambda p: len(p.layers) < p.arch.num_layers, lambda p: p.head == "lowrank",
                 lambda p: p.head == "default"):
        picked += [p for p in plans if want(p)][:1]
    return picked


def _assert_counts_match(base, plans, budget_):
    for p in plans:
        cfg = planner.plan_config(base, p, budget_)
        b = budget.count(cfg, LABELS)
        assert b.trainable == p.trainable, (p.describe(), cfg.lora)
        assert b.head_total == p.head_params and b.lora_total == p.lora_params
        # Exactly the planned modules of the planned layers are adapted, with the planned ranks.
        expected = {(i, s.path): p.rank_of(s) for s in p.sites for i in p.layers}
        per_site = {}
        for i in p.layers:
            for s in p.sites:
                per_site[(i, s.path)] = s.in_features + s.out_features
        got = {}
        for key, n in b.lora.items():
            _, layer, name = key.split(" ", 2)
            # budget's key: the leaf name, or the path inside the layer where leaves repeat
            site = next((s for s in p.sites if s.path == name), None) or \
                next(s for s in p.sites if s.path.rsplit(".", 1)[-1] == name)
            got[(int(layer), site.path)] = n // per_site[(int(layer), site.path)]
        assert got == expected


def test_roberta_base_analysis_and_top_plan(roberta_base_arch):
    base = _base(roberta_base_arch)
    arch, plans = planner.make_plans(base, LABELS, 1_000_000)
    assert arch.container == "roberta.encoder.layer" and arch.num_layers == 12
    assert [(s.role, s.target) for s in arch.sites] == [
        ("q", "query"), ("k", "key"), ("v", "value"), ("o", "attention.output.dense"),
        ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense")]
    assert arch.heads == {"linear": 3_076, "mean": 3_076, "lowrank:16": 28_420, "default": 593_668}
    best = plans[0]
    # Linear head + every linear layer of every block at the rank that fits.
    assert (best.head, best.role_set, len(best.layers), best.rank, best.ffn_rank) == ("linear", "all", 12, 6, None)
    assert best.trainable == 3_076 + 12 * 6 * (4 * 1_536 + 2 * 3_840) == 998_404
    assert all(p.trainable <= 1_000_000 for p in plans)
    # Ranked by breadth first, then budget use (whole percent).
    keys = [(p.adapted, int(100 * p.fill + 1e-9)) for p in plans]
    assert keys == sorted(keys, key=lambda k: (-k[0], -k[1]))
    _assert_counts_match(base, _sample(plans, 10), 1_000_000)


def test_ffn_output_without_attention_output_is_excluded(roberta_base_arch):
    """RoBERTa's FFN output.dense is also a suffix of attention.output.dense: adapting one and not
    the other takes exclude_modules (targets) and a layer-anchored key (rank_pattern)."""
    base = _base(roberta_base_arch)
    _, plans = planner.make_plans(base, LABELS, 1_000_000)
    ffn = next(p for p in plans if p.role_set == "ffn")
    lora = planner.plan_config(base, ffn, 1_000_000).lora
    assert lora.target_modules == ["intermediate.dense", "output.dense"]
    assert lora.exclude_modules == ["attention.output.dense"]
    both = next(p for p in plans if p.role_set == "all" and p.ffn_rank is not None)
    lora = planner.plan_config(base, both, 1_000_000).lora
    assert lora.exclude_modules is None
    assert lora.rank_pattern == {"intermediate.dense": both.ffn_rank, r"\d+\.output\.dense": both.ffn_rank}
    # alpha/r of the base config (16/8) is kept for every module
    assert lora.alpha == 2 * both.rank and set(lora.alpha_pattern.values()) == {2.0 * both.ffn_rank}
    _assert_counts_match(base, [ffn, both], 1_000_000)


def _arch_dir(tmp_path: Path, kind: str) -> Path:
    from transformers import (BertConfig, DebertaV2Config, DistilBertConfig, GPT2Config, LlamaConfig, MPNetConfig)

    small = dict(vocab_size=100)
    cfg = {
        "bert": lambda: BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                   **small),
        "mpnet": lambda: MPNetConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                     **small),
        "distilbert": lambda: DistilBertConfig(dim=32, n_layers=4, n_heads=2, hidden_dim=64, **small),
        "deberta-v2": lambda: DebertaV2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                              intermediate_size=64, **small),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=4, n_head=2, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                   **small),
        "llama": lambda: LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                                     intermediate_size=64, pad_token_id=0, **small),
    }[kind]()
    d = tmp_path / kind
    cfg.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind, roles", [
    ("bert", ["q", "k", "v", "o", "ffn_in", "ffn_out"]),
    ("mpnet", ["q", "k", "v", "o", "ffn_in", "ffn_out"]),
    ("distilbert", ["q", "k", "v", "o", "ffn_in", "ffn_out"]),
    ("deberta-v2", ["q", "k", "v", "o", "ffn_in", "ffn_out"]),
    ("gpt2", ["qkv", "o", "ffn_in", "ffn_out"]),
    ("llama", ["q", "k", "v", "o", "ffn_in", "ffn_in", "ffn_out"]),
])
def test_plan_counts_equal_built_model_on_other_architectures(tmp_path, kind, roles):
    base = _base(_arch_dir(tmp_path, kind))
    arch, plans = planner.make_plans(base, LABELS, 20_000, min_rank=1)
    assert [s.role for s in arch.sites] == roles
    if kind == "mpnet":
        assert [s.target for s in arch.sites][:4] == ["q", "k", "v", "o"]
    assert plans and plans[0].role_set == "all" and len(plans[0].layers) == 4
    _assert_counts_match(base, _sample(plans, 6), 20_000)


def test_dora_counts(roberta_base_arch, tmp_path):
    base = _base(roberta_base_arch, **{"lora.use_dora": True})
    _, plans = planner.make_plans(base, LABELS, 1_000_000)
    _assert_counts_match(base, plans[:2] + [p for p in plans if p.role_set == "qv"][:1], 1_000_000)
    # DoRA adds a magnitude per output feature: on RoBERTa every role set has as many inputs as
    # outputs, so only a model whose FFN projections widen and narrow (LLaMA's) tells them apart
    llama = _base(_arch_dir(tmp_path, "llama"), **{"lora.use_dora": True})
    _, plans = planner.make_plans(llama, LABELS, 20_000, min_rank=1)
    _assert_counts_match(llama, [p for p in plans if any(s.role == "ffn_in" for s in p.sites)][:4], 20_000)


def test_small_budgets_and_nothing_fits(roberta_base_arch):
    base = _base(roberta_base_arch)
    _, plans = planner.make_plans(base, LABELS, 200_000)
    assert plans and all(p.trainable <= 200_000 for p in plans)
    assert plans[0].rank >= 4 and plans[0].head in ("linear", "mean")
    _, none = planner.make_plans(base, LABELS, 3_000)  # not even the linear head fits
    assert none == []
    _, r1 = planner.make_plans(base, LABELS, 200_000, min_rank=1)
    assert r1[0].adapted > plans[0].adapted  # a lower rank floor buys breadth


def test_written_config_trains_as_is(tiny_roberta, agnews_files, tmp_path, capsys):
    """`loraclf plan --write` on a base config with tiny settings; `train` runs the file unchanged,
    with the count the plan printed; the run predicts."""
    from loraclf.predict import Predictor
    from loraclf.train import train

    seed_cfg = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_roberta, agnews_files, out, **{"train.epochs": 1})
    argv = ["plan", "--config", str(seed_cfg), "--budget", "9000", "--min-rank", "2", "--write",
            str(tmp_path / "planned.yaml"), "--json"]
    for k, v in overrides.items():
        argv += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    first = report["plans"][0]
    assert report["written"]["trainable"] == first["trainable"] <= 9_000
    text = (tmp_path / "planned.yaml").read_text()
    assert text.startswith("# Written by `loraclf plan --budget 9000`")
    doc = yaml.safe_load(text)
    assert doc["train"]["max_trainable_params"] == 9_000 and doc["model"]["head"] == first["head"]
    assert doc["data"]["label_names"] is None and doc["train"]["epochs"] == 1  # base sections kept
    result = train(load_config(tmp_path / "planned.yaml"))
    assert result.trainable_params == first["trainable"]
    assert len(Predictor.from_run(out).predict(["shares profit market"])) == 1


def test_rank_pattern_plan_trains(tiny_roberta, agnews_files, tmp_path):
    """A plan with per-module ranks and an exclusion trains and reloads with identical predictions."""
    import numpy as np

    from loraclf.predict import Predictor
    from loraclf.train import train

    out = tmp_path / "run"
    base = load_config(None, tiny_overrides(tiny_roberta, agnews_files, out, **{"train.epochs": 1}))
    _, plans = planner.make_plans(base, LABELS, 12_000, min_rank=2)
    chosen = next(p for p in plans if p.role_set == "ffn" and p.ffn_rank is None)
    cfg = planner.plan_config(base, chosen, 12_000)
    assert cfg.lora.exclude_modules == ["attention.output.dense"]
    result = train(cfg)
    assert result.trainable_params == chosen.trainable
    texts = ["shares profit market", "coach league goal"]
    p = Predictor.from_run(out, precision="fp32")
    unmerged = Predictor.from_run(out, merge=False, precision="fp32")
    np.testing.assert_allclose(p.logits(texts), unmerged.logits(texts), atol=1e-5)


def test_cli_plan_table_top_and_errors(roberta_base_arch, tmp_path, capsys, monkeypatch):
    base = ["plan", "--model.name_or_path", str(roberta_base_arch), "--data.label_names", json.dumps(LABELS)]
    assert main(base + ["--budget", "1000000", "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.strip()[:2].strip().isdigit()]
    assert len(rows) == 3 and "998,404" in rows[0] and "99.8%" in rows[0] and "linear" in rows[0]
    assert "attn-out=attention.output.dense" in out

    assert main(base + ["--budget", "1000000", "--json", "--top", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["candidates"] == len(doc["plans"]) > 50 and doc["plans"][0]["pick"] == 1

    path = tmp_path / "p3.yaml"
    assert main(base + ["--budget", "1000000", "--write", str(path), "--pick", "3", "--heads", "linear,default"]) == 0
    out = capsys.readouterr().out
    third = [ln for ln in out.splitlines() if ln.strip().startswith("3 ")][0]
    counted = budget.count(load_config(path), LABELS).trainable
    assert f"{counted:,}" in third and f"wrote {path}: #3" in out
    # a written plan is a new recipe with its own run directory, not the base config's
    seed = str(Path(__file__).parents[1] / "configs" / "agnews-seed.yaml")
    # an existing file is replaced only when asked (the base recipe itself never: it was, silently)
    assert main(base + ["--config", seed, "--write", str(path)]) == 2
    assert f"--write {path} already exists" in capsys.readouterr().err
    copy = tmp_path / "agnews-seed.yaml"
    copy.write_text(Path(seed).read_text())
    assert main(base + ["--config", str(copy), "--write", str(copy), "--overwrite"]) == 2
    assert "is the --config file" in capsys.readouterr().err and copy.read_text() == Path(seed).read_text()
    assert main(base + ["--config", seed, "--train.overwrite", "true", "--write", str(path), "--overwrite"]) == 0
    capsys.readouterr()
    written = load_config(path).train
    assert (written.output_dir, written.overwrite) == ("runs/p3", False)
    assert load_config(seed).train.output_dir != "runs/p3"
    # runs/<stem>: dotted names stay apart; the base recipe's own run directory is never reused
    (tmp_path / "plans").mkdir()
    for name, want in (("best.r8.yaml", "runs/best.r8"), ("best.r16.yaml", "runs/best.r16"),
                       ("agnews-seed.yaml", "runs/agnews-seed-plan")):
        assert main(base + ["--config", seed, "--write", str(tmp_path / "plans" / name)]) == 0
        assert f"wrote {tmp_path / 'plans' / name}: #1," in capsys.readouterr().out  # was "#None" without --pick
        assert load_config(tmp_path / "plans" / name).train.output_dir == want
    # the base recipe's run directory written as an absolute path is the same directory
    own = tmp_path / "own.yaml"
    own.write_text(Path(seed).read_text().replace("output_dir: runs/agnews-seed",
                                                  f"output_dir: {tmp_path / 'runs' / 'own'}"))
    monkeypatch.chdir(tmp_path)
    assert main(base + ["--config", str(own), "--write", str(tmp_path / "plans" / "own.yaml")]) == 0
    capsys.readouterr()
    assert load_config(tmp_path / "plans" / "own.yaml").train.output_dir == "runs/own-plan"
    assert main(base + ["--pick", "2"]) == 2  # without --write it was silently ignored
    assert "--pick chooses what --write writes" in capsys.readouterr().err

    # what would fit, not "raise --budget" where that cannot help
    # the smallest plan's total, which fits exactly, not the cheapest head's 3,076 (3,077 did not fit either)
    assert main(base + ["--budget", "2000"]) == 2
    assert ("nothing fits a budget of 2,000 with LoRA rank >= 4 — fix: raise --budget to at least 39,940 (the "
            "smallest plan: linear head, LoRA r=4 on qv, top 3 layers), or lower --min-rank") in capsys.readouterr().err
    assert main(base + ["--budget", "39939"]) == 2 and "at least 39,940" in capsys.readouterr().err
    # a budget as people write one (argparse's int refused all three)
    for spelled in ("1e6", "1_000_000", "1,000,000"):
        assert main(base + ["--budget", spelled, "--top", "1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["budget"] == 1_000_000
    with pytest.raises(SystemExit) as e:  # argparse's own exit, usage and the error
        main(base + ["--budget", "1.5e-3"])
    assert e.value.code == 2 and "invalid count: '1.5e-3' is not a whole number" in capsys.readouterr().err
    for decimal_comma in ("1,5", "1,5e6", "10,00"):  # not 15, 15,000,000, 1,000
        with pytest.raises(SystemExit):
            main(base + ["--budget", decimal_comma])
        assert "commas only between groups of three digits" in capsys.readouterr().err
    assert main(base + ["--budget", "39940", "--top", "1"]) == 0
    assert "39,940" in capsys.readouterr().out
    assert main(base + ["--min-rank", "1000", "--max-rank", "1000"]) == 2
    assert "fix: lower --min-rank to at most 768, the largest LoRA rank" in capsys.readouterr().err
    assert main(base + ["--budget", "3500"]) == 2
    assert "fix: raise --budget to at least 39,940" in capsys.readouterr().err
    assert main(base + ["--heads", "pooled"]) == 2
    assert "unknown head 'pooled'" in capsys.readouterr().err
    assert main(base + ["--budget", "1000000", "--write", str(path), "--pick", "100000", "--overwrite"]) == 2
    assert "--pick 100000" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates_and_fits_its_budget(roberta_base_arch, path):
    cfg = load_config(path, {"model.name_or_path": str(roberta_base_arch)})
    b = budget.count(cfg, cfg.data.label_names or LABELS)
    assert b.trainable <= cfg.train.max_trainable_params
    if path.name == "agnews-seed.yaml":
        assert (b.trainable, b.lora_total, b.head_total) == (777_988, 184_320, 593_668)
    if path.name == "agnews-best.yaml":
        assert (b.trainable, b.head_total) == (998_404, 3_076)


def test_plan_leaves_out_a_default_head_the_checkpoint_lacks(tiny_roberta, tmp_path, capsys):
    """DeBERTa-v2's own head needs a pooler that a base checkpoint lacks: the planner counted it,
    ranked it, and wrote it as a config that train then refused."""
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    DebertaV2Model(DebertaV2Config(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, pad_token_id=1)).save_pretrained(tmp_path / "deberta")
    base = ["plan", "--model.name_or_path", str(tmp_path / "deberta"), "--data.label_names", json.dumps(LABELS),
            "--budget", "20000", "--top", "0", "--json"]
    assert main(base) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["heads_left_out"]) == {"default"} and "pooler.dense.bias" in doc["heads_left_out"]["default"]
    assert "default" not in doc["heads"] and {p["head"] for p in doc["plans"]} == {"linear", "mean", "lowrank"}
    assert main(base + ["--heads", "default"]) == 2
    err = capsys.readouterr().err
    assert "--heads default: the checkpoint lacks its weights (pooler.dense.bias" in err and "--heads linear" in err
    # a checkpoint with the weights (roberta's pooler is in a base checkpoint) keeps its own head
    assert main(base[:2] + [str(tiny_roberta)] + base[3:]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["heads_left_out"] == {} and "default" in doc["heads"]


@pytest.mark.parametrize("kind", ["vit", "bert-pad-beyond-vocab"])
def test_plan_and_params_on_a_model_without_such_a_classifier_are_one_line(tmp_path, capsys, kind):
    """A config transformers has no sequence-classification model for (ViT), or one it cannot
    build (a pad_token_id beyond vocab_size: torch's AssertionError), was a traceback."""
    from transformers import BertConfig, ViTConfig

    if kind == "vit":
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(
            tmp_path / kind)
    else:
        BertConfig(vocab_size=50, pad_token_id=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64).save_pretrained(tmp_path / kind)
    for cmd in ("plan", "params"):
        assert main([cmd, "--model.name_or_path", str(tmp_path / kind), "--data.label_names", '["a", "b"]']) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "cannot build a sequence-classification model from the config of" in err


def test_plan_leaves_out_heads_the_model_has_no_place_for(tmp_path, capsys):
    """BART's classifier sits in a head of its own (no ``classifier``/``score`` attribute): the
    replacement heads cannot be installed, and the whole plan failed with a hint for train. (A
    checkpoint that holds that head: a BART classifier already, whose own head stays frozen.)"""
    import torch
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    BartForSequenceClassification(BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=len(LABELS),
    )).save_pretrained(tmp_path / "bart")
    base = ["plan", "--model.name_or_path", str(tmp_path / "bart"), "--data.label_names", json.dumps(LABELS),
            "--budget", "20000", "--top", "0", "--json", "--min-rank", "1"]
    assert main(base) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["heads_left_out"]) == set(planner.DEFAULT_HEADS) - {"default"}
    assert "cannot find the classifier" in doc["heads_left_out"]["linear"]
    assert doc["plans"] and {p["head"] for p in doc["plans"]} == {"default"}
    assert main(base + ["--heads", "linear,mean"]) == 2
    err = capsys.readouterr().err
    assert "--heads linear: cannot find the classifier" in err and "fix: plan with --heads default" in err


def test_a_default_head_peft_does_not_train_is_left_out_without_a_checkpoint_that_holds_it(tmp_path, capsys):
    """XLM's own head (sequence_summary) is no module PEFT trains: for a hub name or a folder
    without weights, plan ranked "default 0" as a free head and params counted it without a word;
    train then refused it after the download."""
    from transformers import XLMConfig

    XLMConfig(vocab_size=50, emb_dim=32, n_layers=2, n_heads=2, pad_token_id=2).save_pretrained(tmp_path / "xlm")
    base = ["--model.name_or_path", str(tmp_path / "xlm"), "--data.label_names", json.dumps(LABELS)]
    assert main(["plan", *base, "--budget", "20000", "--min-rank", "1", "--heads", "default"]) == 2
    err = capsys.readouterr().err
    assert "--heads default: PEFT trains none of this model's own head (no module named classifier or score)" in err
    assert main(["params", *base, "--lora.target_modules", "[q_lin,v_lin]"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"head +0\n", out) and "PEFT trains none of this model's own head" in out


def test_the_same_head_named_twice_is_planned_once(tiny_roberta, capsys):
    base = ["plan", "--model.name_or_path", str(tiny_roberta), "--data.label_names", json.dumps(LABELS),
            "--budget", "20000", "--top", "0", "--json", "--heads", "lowrank,lowrank:16,linear,lowrank:016,linear"]
    assert main(base) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["heads"]) == ["lowrank", "linear"]


def test_a_plan_on_layer_0_written_from_a_recipe_that_insists_on_the_prefix_cache_trains(
        tiny_roberta, agnews_files, tmp_path, capsys, monkeypatch):
    """train.cache_frozen_prefix true in the base recipe, a plan that adapts layer 0: the written
    file was refused by train ("no frozen prefix to cache")."""
    monkeypatch.chdir(tmp_path)  # the written plan trains into runs/<its name>
    base_cfg = tmp_path / "base.yaml"
    o = tiny_overrides(tiny_roberta, agnews_files, tmp_path / "run", **{"train.epochs": 1,
                                                                        "train.cache_frozen_prefix": True,
                                                                        "data.max_train_samples": 32})
    doc: dict = {}
    for key, value in o.items():
        section, name = key.split(".")
        doc.setdefault(section, {})[name] = value
    base_cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--config", str(base_cfg), "--budget", "9000", "--min-rank", "2", "--write", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert 0 in (written["lora"]["layers"] or [0]) and written["train"]["cache_frozen_prefix"] is None
    capsys.readouterr()
    assert main(["train", "--config", str(out)]) == 0


def test_plan_counts_agree_on_a_mixture_of_experts_model(tmp_path):
    """PEFT (0.18+, transformers 5) turns gate/up/down_proj targets of a DeepSeek-V2-style MoE into
    LoRA on the fused expert weights: the table showed 19,868 for a model of 49,820 (52 of 59
    plans wrong) and the top pick could not be written. Such sites are now left out, saying why."""
    from transformers import DeepseekV2Config

    DeepseekV2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                     num_experts_per_tok=2, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24,
                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=100,
                     pad_token_id=0).save_pretrained(tmp_path / "moe")
    base = _base(tmp_path / "moe")
    arch, plans = planner.make_plans(base, LABELS, 20_000, min_rank=1)
    assert plans
    _assert_counts_match(base, plans, 20_000)  # every plan, not a sample: most were wrong
    assert all("fused" in why or "PEFT cannot adapt" in why for why in arch.left_out.values())
    assert not {s.path for s in arch.sites} & set(arch.left_out)


def test_nothing_is_left_out_where_peft_adapts_every_linear_layer(roberta_base_arch):
    arch = planner.analyze(_base(roberta_base_arch), LABELS)
    assert arch.left_out == {} and len(arch.sites) == 6
