import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from loraclf.config import LoraSettings, ModelConfig, load_config
from loraclf.model import build_model, load_model_config
from loraclf.precision import autocast, cast_frozen_matmul_weights, choose_precision
from loraclf.train import train

NAMES = ["World", "Sports", "Business", "Sci/Tech"]
SEED = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"


def test_frozen_weights_in_bf16_give_exactly_the_autocast_result(tiny_roberta):
    mcfg = ModelConfig(name_or_path=str(tiny_roberta))
    torch.manual_seed(0)
    model = build_model(mcfg, LoraSettings(r=4, alpha=8, layers=[1, 2]), load_model_config(mcfg, NAMES)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[0, 5, 9, 13, 2], [0, 7, 2, 1, 1]])
    mask = (ids != 1).long()
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, "bf16"):
        before = model(input_ids=ids, attention_mask=mask).logits
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    n = cast_frozen_matmul_weights(model)
    # 4 layers x 6 linear layers (q, k, v, attention output, FFN in, FFN out) x (weight + bias),
    # plus PEFT's frozen original of the trained head (dense + out_proj, weight + bias)
    assert n == 4 * 6 * 2 + 4
    assert all(p.dtype == torch.float32 for n_, p in model.named_parameters() if n_ in trainable)
    assert all(p.dtype == torch.float32 for n_, p in model.named_parameters() if "LayerNorm" in n_ or "embeddings" in n_)
    with torch.no_grad(), autocast(cpu, "bf16"):
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert cast_frozen_matmul_weights(model) == 0  # idempotent


def test_bf16_training_keeps_trainable_weights_fp32_and_learns(tiny_roberta, agnews_files, tmp_path):
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r",
                                           **{"train.precision": "bf16", "train.epochs": 3}))
    train(cfg)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["precision"] == "bf16" and info["status"] == "complete"
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "r" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    # ... and the optimizer stepped them: every LoRA B moved from its zero start
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)


@pytest.mark.parametrize("variant", [{}, {"lora.use_dora": True, "model.head": "linear"}])
def test_evaluate_and_report_reproduce_a_bf16_run_s_metrics(tiny_roberta, agnews_files, tmp_path, variant):
    """evaluate and the report computed with merged weights held in bf16, training with fp32
    weights under autocast: other logits (~3e-3 here), so another accuracy than run.json's, and a
    report whose per-class section contradicted its own metrics table. With DoRA, the loaded
    (frozen) LoRA matrices were cast to bf16 along with the base weights, where training held
    them in fp32: the loss differed in the 6th digit."""
    from loraclf.evaluate import evaluate_run

    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r",
                                           **{"train.precision": "bf16", "train.epochs": 3,
                                              "train.learning_rate": 3e-2, **variant}))
    train(cfg)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    test = info["metrics"]["test"]
    r = evaluate_run(tmp_path / "r")
    assert r["precision"] == "bf16"
    assert (r["accuracy"], r["macro_f1"], r["loss"]) == (test["accuracy"], test["macro_f1"], test["loss"])
    report = (tmp_path / "r" / "report.md").read_text()
    assert f"accuracy {100 * test['accuracy']:.2f} %" in report  # the per-class section's, on all test rows


def test_precision_choice(monkeypatch):
    import loraclf.precision

    cpu = torch.device("cpu")
    for native, auto in ((True, "bf16"), (False, "fp32")):  # AMX / avx512_bf16, or neither
        monkeypatch.setattr(loraclf.precision, "cpu_has_native_bf16", lambda native=native: native)
        assert choose_precision("auto", cpu) == auto
        assert choose_precision("fp32", cpu) == "fp32"
        assert choose_precision("bf16", cpu) == "bf16"  # emulated when asked explicitly


def test_auto_does_not_pick_emulated_bf16_on_a_pre_ampere_gpu(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a V100/T4 (compute capability 7.x), where bf16
    is emulated and slower than fp32: auto picked it. Asked for by name, bf16 still runs there."""
    import pytest

    from loraclf.errors import ConfigError

    native = {"value": False}

    def supported(including_emulation=True):
        return native["value"] or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    cuda = torch.device("cuda")
    assert choose_precision("auto", cuda) == "fp32" and choose_precision("bf16", cuda) == "bf16"
    native["value"] = True  # Ampere and later
    assert choose_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ConfigError, match="bf16 is not supported on cuda"):
        choose_precision("bf16", cuda)
