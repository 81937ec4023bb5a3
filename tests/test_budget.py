from pathlib import Path

import pytest

from loraclf import budget
from loraclf.config import load_config
from loraclf.errors import BudgetError, ModelError
from loraclf.model import build_model, load_model_config

SEED = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"
AG = ["World", "Sports", "Business", "Sci/Tech"]


def test_seed_preset_counts_777988_on_roberta_base(roberta_base_arch):
    cfg = load_config(SEED, {"model.name_or_path": str(roberta_base_arch)})
    b = budget.count(cfg, AG)
    assert b.trainable == 777_988
    assert b.lora_total == 184_320 and b.head_total == 593_668
    assert b.head == {"classifier.dense": 590_592, "classifier.out_proj": 3_076}
    assert set(b.lora) == {f"layer {i} {m}" for i in (0, 1, 5, 10, 11) for m in ("query", "value")}
    assert all(v == 12 * (768 + 768) for v in b.lora.values())
    # RobertaModel has 124,645,632 parameters with its pooler (590,592), which classification drops.
    assert b.total == 124_645_632 - 590_592 + 777_988


@pytest.mark.parametrize("variant", [{}, {"lora.use_dora": True, "model.head": "linear"},
                                     {"lora.rank_pattern": {"key": 5}, "model.head": "lowrank", "model.head_rank": 2}])
def test_count_matches_the_model_that_trains(tiny_roberta, variant):
    cfg = load_config(None, {"model.name_or_path": str(tiny_roberta), "lora.r": 3, "lora.layers": [1, 3],
                             "lora.target_modules": ["query", "key", "dense"], **variant})
    counted = budget.count(cfg, ["a", "b", "c"])
    real = build_model(cfg.model, cfg.lora, load_model_config(cfg.model, ["a", "b", "c"]))
    assert counted.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert counted.total == budget.breakdown(real).total


def test_encoder_and_decoder_layers_are_counted_apart(tmp_path):
    """T5 numbers its encoder's and decoder's blocks alike: 'layer 0 layer.0.SelfAttention.q' was
    the two modules added up (96 for two 48-parameter adapters)."""
    from transformers import T5Config

    T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0,
             pad_token_id=0).save_pretrained(tmp_path)
    cfg = load_config(None, {"model.name_or_path": str(tmp_path), "lora.target_modules": ["q"], "lora.r": 1})
    b = budget.count(cfg, AG)
    assert b.lora == {f"{stack} layer {i} {path}": 32 + 16 for i in (0, 1) for stack, path in (
        ("encoder", "layer.0.SelfAttention.q"), ("decoder", "layer.0.SelfAttention.q"),
        ("decoder", "layer.1.EncDecAttention.q"))}
    assert b.lora_total == sum(b.lora.values()) == 6 * 48  # r=1: d_model 32 in, 2 heads x d_kv 8 out


def test_over_budget_names_count_budget_and_largest(roberta_base_arch):
    cfg = load_config(SEED, {"model.name_or_path": str(roberta_base_arch), "lora.r": 64, "lora.layers": None})
    b = budget.count(cfg, AG)
    with pytest.raises(BudgetError) as e:
        budget.check(b, cfg.train.max_trainable_params)
    msg = str(e.value)
    assert f"{b.trainable:,}" in msg and "1,000,000" in msg and "head classifier.dense 590,592" in msg
    assert "\n" not in msg


def test_layer_beyond_depth_is_an_error(tiny_roberta):
    cfg = load_config(None, {"model.name_or_path": str(tiny_roberta), "lora.layers": [0, 4]})
    with pytest.raises(ModelError, match=r"layer\(s\) \[4\] do not exist: the model has 4 layers"):
        budget.count(cfg, ["a", "b"])


def test_unknown_target_module_lists_real_ones(tiny_roberta):
    cfg = load_config(None, {"model.name_or_path": str(tiny_roberta), "lora.target_modules": ["q_proj"]})
    with pytest.raises(ModelError, match=r"\['q_proj'\] not found.*query"):
        budget.count(cfg, ["a", "b"])


def test_bert_style_counts(tiny_bert):
    cfg = load_config(None, {"model.name_or_path": str(tiny_bert), "lora.r": 2})
    b = budget.count(cfg, ["a", "b", "c", "d"])
    # 2 layers x (query, value) x r*(in+out) + linear classifier 32*4+4
    assert b.lora_total == 2 * 2 * 2 * (32 + 32) and b.head == {"classifier": 132}


def test_counting_allocates_no_lora_weights(roberta_base_arch, monkeypatch):
    """The LoRA matrices were built (and initialised) in real memory and only then moved to the
    base layer's meta device: a rank of 10^6 made `params` and `train` spend minutes allocating
    and initialising 128 GB before naming the budget. Every LoRA init must see a meta tensor."""
    import torch.nn as nn

    seen = []
    real_init = nn.init.kaiming_uniform_

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        return real_init(tensor, *args, **kwargs)

    monkeypatch.setattr(nn.init, "kaiming_uniform_", spy)
    cfg = load_config(None, {"model.name_or_path": str(roberta_base_arch), "lora.r": 4})
    model = build_model(cfg.model, cfg.lora, load_model_config(cfg.model, ["a", "b", "c", "d"]), meta=True)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert seen and set(seen) == {"meta"}
    big = load_config(None, {"model.name_or_path": str(roberta_base_arch), "lora.r": 1_000_000})
    with pytest.raises(BudgetError, match="exceed"):
        budget.check(budget.count(big, ["a", "b", "c", "d"]), big.train.max_trainable_params)
