import re
import warnings

import torch
import pytest

from loraclf.config import load_config
from loraclf.errors import ModelError
from loraclf.model import build_model, load_adapter, load_base, load_model_config, load_tokenizer

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def _unknown_tokenizer_class(tiny_roberta, tmp_path):
    import json
    import shutil

    moved = tmp_path / "model"
    shutil.copytree(tiny_roberta, moved)
    conf = json.loads((moved / "tokenizer_config.json").read_text())
    conf["tokenizer_class"] = "TokenizerOfTheFuture"
    (moved / "tokenizer_config.json").write_text(json.dumps(conf))
    return moved


def test_a_tokenizer_class_this_transformers_lacks_loads_from_its_tokenizer_json(tiny_roberta, tmp_path):
    """transformers 5 saves a generic fast tokenizer as class "TokenizersBackend", unknown to
    4.x: a run trained on 5.x could not be evaluated, predicted or served on 4.x ("cannot load
    the run's tokenizer ... restore it from a copy"). Quietly: 4.x warned in three lines that the
    class differs, on every load."""
    import logging

    moved = _unknown_tokenizer_class(tiny_roberta, tmp_path)
    said = []
    listen = logging.Handler(logging.WARNING)
    listen.emit = said.append  # transformers' loggers do not propagate to pytest's capture
    logging.getLogger("transformers").addHandler(listen)
    text = ["the match goal coach <pad> shares"]
    want = load_tokenizer(load_config(None, {"model.name_or_path": str(tiny_roberta)}).model)
    for mcfg, path in ((load_config(None, {"model.name_or_path": str(moved)}).model, None),  # a base model
                       (load_config(None, {"model.name_or_path": str(tiny_roberta)}).model, str(moved))):  # a run's
        tok = load_tokenizer(mcfg, path)
        assert tok(text)["input_ids"] == want(text)["input_ids"] and tok.pad_token_id == want.pad_token_id
    logging.getLogger("transformers").removeHandler(listen)
    assert [r.getMessage() for r in said] == []


def test_a_tokenizer_class_this_transformers_lacks_without_tokenizer_json_is_named(tiny_roberta, tmp_path):
    """Without tokenizer.json there is nothing to fall back on: the error names the class, not
    whatever the fallback tripped over (4.x: a missing protobuf; 5.x: "couldn't instantiate the
    backend")."""
    from transformers import PreTrainedTokenizerFast

    moved = _unknown_tokenizer_class(tiny_roberta, tmp_path)
    PreTrainedTokenizerFast(tokenizer_file=str(moved / "tokenizer.json")).backend_tokenizer.model.save(str(moved))
    (moved / "tokenizer.json").unlink()  # vocab.json + merges.txt remain
    with pytest.raises(ModelError, match="TokenizerOfTheFuture.*not in transformers.*no tokenizer.json"):
        load_tokenizer(load_config(None, {"model.name_or_path": str(moved)}).model)


def _model(path, **kw):
    cfg = load_config(None, {"model.name_or_path": str(path), "lora.r": 4, "lora.dropout": 0.0, **kw})
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.lora, load_model_config(cfg.model, NAMES))


def _batch(path):
    tok = load_tokenizer(load_config(None, {"model.name_or_path": str(path)}).model)
    return tok(["the match goal coach", "shares profit at the bank today"], padding=True, return_tensors="pt")


@pytest.mark.parametrize("which", ["tiny_roberta", "tiny_bert"])
def test_step_changes_only_trainable_weights(which, request):
    path = request.getfixturevalue(which)
    _, model = _model(path)
    # Base weights are chosen by name, not by requires_grad (the flag under test): everything but
    # the LoRA matrices and the trained copy of the head.
    base = {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n}
    assert len(base) > 10 and not [n for n in base if model.get_parameter(n).requires_grad]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n not in base}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(path)
    model.train()
    model(**batch, labels=torch.tensor([1, 2])).loss.backward()
    opt.step()
    assert all(torch.equal(model.get_parameter(n), p) for n, p in base.items())
    changed = [n for n, p in trained.items() if not torch.equal(model.get_parameter(n), p)]
    assert any("lora_B" in n for n in changed) and any("classifier" in n for n in changed)


def _train_a_bit(model, path):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = _batch(path)
    for _ in range(3):
        model(**batch, labels=torch.tensor([1, 2])).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), batch


@pytest.mark.parametrize("variant", [{}, {"lora.use_dora": True, "model.head": "linear"},
                                     {"lora.use_rslora": True, "model.head": "lowrank", "model.head_rank": 4}],
                         ids=["lora", "dora-linear-head", "rslora-lowrank-head"])
def test_save_load_gives_identical_logits_and_merged_equals_unmerged(tiny_roberta, tmp_path, variant):
    cfg, model = _model(tiny_roberta, **variant)
    dora = any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    assert dora == bool(variant.get("lora.use_dora"))
    model, batch = _train_a_bit(model, tiny_roberta)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    base = load_base(cfg.model, load_model_config(cfg.model, NAMES))
    loaded = load_adapter(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        merged = loaded.merge_and_unload().eval()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_adapter_loads_with_peft_auto_class(tiny_roberta, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    _, model = _model(tiny_roberta)
    model, batch = _train_a_bit(model, tiny_roberta)
    model.save_pretrained(tmp_path / "adapter")
    # the README's snippet: class names come from the run's labels.json
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(tmp_path / "adapter"), num_labels=len(NAMES), id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)}).eval()
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, model(**batch).logits)
    assert peft_model.config.id2label == dict(enumerate(NAMES))


def test_missing_local_model_dir(tmp_path):
    cfg = load_config(None, {"model.name_or_path": str(tmp_path)})
    with pytest.raises(ModelError, match="cannot load model config from"):
        load_model_config(cfg.model, NAMES)
    # a path that does not exist (a run's base model that moved) is not blamed on the hub
    gone = load_config(None, {"model.name_or_path": str(tmp_path / "moved")})
    with pytest.raises(ModelError, match=r"model directory '.*moved' does not exist.*config.yaml") as e:
        load_model_config(gone.model, NAMES)
    assert "Hugging Face Hub" not in str(e.value)


def test_unreachable_hub_model_is_one_clear_line():
    cfg = load_config(None, {"model.name_or_path": "no-such-org/no-such-model"})
    with pytest.raises(ModelError) as e:
        load_model_config(cfg.model, NAMES)
    msg = str(e.value)
    assert "not reachable on the Hugging Face Hub" in msg and "--model.name_or_path" in msg and "\n" not in msg
    # offline on purpose (the tests are): setting HF_HUB_OFFLINE=1 is no advice, unsetting it is
    assert "unset HF_HUB_OFFLINE" in msg and "set HF_HUB_OFFLINE=1" not in msg


def test_adapter_without_safetensors_is_refused(tiny_roberta, tmp_path):
    cfg, model = _model(tiny_roberta)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ModelError, match="safetensors only"):
        load_adapter(load_base(cfg.model, load_model_config(cfg.model, NAMES)), tmp_path / "adapter")


def test_lora_that_adapts_nothing_is_one_clear_error(tiny_roberta):
    # PEFT's NoMatchingPeftModuleError came out as a traceback (exit 1), e.g. every targeted
    # module excluded, or a layer index that ALBERT's shared block does not have
    with pytest.raises(ModelError, match=r"LoRA would adapt nothing: no linear layer matches lora.target_modules "
                                         r"\['query', 'value'\] in every layer, outside lora.exclude_modules"):
        _model(tiny_roberta, **{"lora.exclude_modules": ["query", "value"]})


def test_a_misspelt_exclusion_is_refused_not_ignored(tiny_roberta):
    """PEFT ignores an exclude_modules entry that matches nothing: 'atention.output.dense' adapted
    the very modules the user meant to keep frozen, and the count said nothing."""
    with pytest.raises(ModelError, match=r"exclude_modules entry 'atention.output.dense' matches no module.*"
                                         r"linear layers: \['dense', 'key', 'out_proj', 'query', 'value'\]"):
        _model(tiny_roberta, **{"lora.target_modules": ["query", "dense"],
                                "lora.exclude_modules": ["atention.output.dense"]})
    _, model = _model(tiny_roberta, **{"lora.target_modules": ["query", "dense"],
                                       "lora.exclude_modules": ["attention.output.dense"]})
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and not any(n.endswith("attention.output.dense") for n in adapted)


@pytest.mark.parametrize("field, key", [("rank_pattern", "key"), ("alpha_pattern", "querry"),
                                        ("rank_pattern", r"layer\.3\.attention\.self\.query"),
                                        # the PeftModel's own name for it: PEFT matches the base model's
                                        # names, so the key was ignored while this check passed it
                                        ("rank_pattern", r"base_model\.model\.roberta\.encoder\.layer\.1\.attention\.self\.query")])
def test_a_pattern_key_matching_no_adapted_module_is_refused(tiny_roberta, field, key):
    """A key naming a linear layer LoRA does not adapt ('key' with target_modules [query], or a
    layer outside lora.layers) or none at all changed nothing, and the count was at the base rank."""
    with pytest.raises(ModelError, match=rf"lora: {field} key '{re.escape(key)}' matches no module LoRA adapts.*"
                                         r"adapted: \['query'\]"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _model(tiny_roberta, **{"lora.target_modules": ["query"], "lora.layers": [0, 1], f"lora.{field}": {key: 4}})
    # PEFT's own warning about the key reached stderr before loraclf's error: the library prints nothing
    assert not [w for w in seen if "did not match" in str(w.message)], [str(w.message) for w in seen]
    _, model = _model(tiny_roberta, **{"lora.target_modules": ["query"], "lora.layers": [0, 1],
                                       "lora.rank_pattern": {r"layer\.1\.attention\.self\.query": 2}})
    ranks = {n.split(".layer.")[1][:1]: p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {"0": 4, "1": 2}


def test_lora_on_the_classification_head_is_refused(tiny_bert, tmp_path):
    """PEFT trains the head whole (modules_to_save): targeting BERT's 'classifier' adapted nothing
    in silence, and DistilBERT's 'pre_classifier' died in PEFT with a TypeError traceback."""
    from transformers import DistilBertConfig, DistilBertModel

    with pytest.raises(ModelError, match=r"target module\(s\) \['classifier'\] are in the classification head"):
        _model(tiny_bert, **{"lora.target_modules": ["query", "classifier"]})
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     pad_token_id=0)).save_pretrained(tmp_path / "distilbert")
    with pytest.raises(ModelError, match=r"\['pre_classifier'\] are in the classification head.*model.head"):
        _model(tmp_path / "distilbert", **{"lora.target_modules": ["q_lin", "pre_classifier"]})
    # a name the encoder and the head share adapts the encoder's modules only, as before
    _, model = _model(tiny_bert, **{"lora.target_modules": ["dense"]})
    assert not [n for n, _ in model.named_parameters() if "lora_" in n and "classifier" in n]


def test_loading_hides_the_load_report_and_refuses_missing_encoder_weights(tiny_roberta, agnews_files, tmp_path,
                                                                          capfd):
    """transformers calls the head MISSING on every load (new for training, restored from the
    adapter for a run): a Python user was told their trained classifier was random. Weights the
    checkpoint lacks in the encoder were only logged, and the CLI (errors only) trained in silence
    on a layer of random frozen weights."""
    import logging
    import shutil
    import warnings

    import transformers
    from safetensors.torch import load_file, save_file

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # the CLI tests lower it to errors only
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.enable_progress_bar()  # ... and turn the bars off
    try:
        cfg, model = _model(tiny_roberta)
        model.save_pretrained(tmp_path / "adapter")
        records.clear()
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_adapter(load_base(cfg.model, load_model_config(cfg.model, NAMES)), tmp_path / "adapter")
        # transformers 5's LOAD REPORT, transformers 4's "newly initialized" / "not used" warnings
        said = [r.getMessage() for r in records]
        assert not [m for m in said if "LOAD REPORT" in m or "initializ" in m], said
        assert "Loading weights" not in capfd.readouterr().err  # transformers 5's progress bar
        assert transformers.utils.logging.is_progress_bar_enabled()  # the caller's setting restored
        assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
        holed = tmp_path / "holed"
        shutil.copytree(tiny_roberta, holed)
        weights = next(holed.glob("*.safetensors"))
        tensors = load_file(weights)
        dropped = next(k for k in tensors if "layer.0.attention.self.key.weight" in k)
        save_file({k: v for k, v in tensors.items() if k != dropped}, weights, metadata={"format": "pt"})
        lacks = r"lacks 1 encoder weight\(s\) \(roberta\.encoder\.layer\.0\.attention\.self\.key\.weight\)"
        for head in ("linear", "default"):
            hcfg = load_config(None, {"model.name_or_path": str(holed), "model.head": head})
            with pytest.raises(ModelError, match=lacks):
                load_base(hcfg.model, load_model_config(hcfg.model, NAMES))
        # and train refuses it before writing a run folder (which would be left behind "failed")
        from conftest import tiny_overrides

        from loraclf.train import train

        out = tmp_path / "run"
        with pytest.raises(ModelError, match=lacks):
            train(load_config(None, tiny_overrides(holed, agnews_files, out)))
        assert not out.exists()
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
        if not bars:
            transformers.logging.disable_progress_bar()


@pytest.mark.parametrize("arch, targets, want", [
    # XLM keeps a layer's attention and feed-forward in two parallel lists: both are layers
    ("xlm", ["q_lin", "lin1"], {"transformer.attentions.1.q_lin", "transformer.ffns.1.lin1"}),
    # numbered sub-layers inside each block: PEFT before 0.18 read 'layer.0' / 'layer.1' as the layer
    # numbered sub-layers inside each block: PEFT before 0.18 read 'layer.0' / 'layer.1' as the layer
    ("t5", ["q", "wi"], {"transformer.encoder.block.1.layer.0.SelfAttention.q",
                         "transformer.encoder.block.1.layer.1.DenseReluDense.wi",
                         "transformer.decoder.block.1.layer.0.SelfAttention.q",
                         "transformer.decoder.block.1.layer.1.EncDecAttention.q",
                         "transformer.decoder.block.1.layer.2.DenseReluDense.wi"}),
])
def test_lora_layers_adapts_exactly_the_chosen_layers(arch, targets, want, tmp_path):
    from transformers import T5Config, XLMConfig

    if arch == "xlm":
        XLMConfig(vocab_size=50, emb_dim=32, n_layers=2, n_heads=2, pad_token_id=2).save_pretrained(tmp_path)
    else:
        T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0,
                 pad_token_id=0).save_pretrained(tmp_path)
    cfg = load_config(None, {"model.name_or_path": str(tmp_path), "lora.target_modules": targets,
                             "lora.layers": [1]})
    model = build_model(cfg.model, cfg.lora, load_model_config(cfg.model, NAMES), meta=True)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == want
