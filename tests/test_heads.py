"""Heads (model.head): exact counts, training touches only trainable tensors, save -> load gives
the same logits, pooling reads the right tokens; and the recipe options that came with them
(label smoothing, LoRA+, early stopping)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from loraclf import budget
from loraclf.config import load_config
from loraclf.errors import ConfigError
from loraclf.model import build_model, check_weights, load_adapter, load_base, load_model_config

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
HEADS = ["default", "linear", "mean", "lowrank"]


def _cfg(model_dir: Path, head: str, **extra):
    return load_config(None, {"model.name_or_path": str(model_dir), "model.head": head, **extra})


@pytest.mark.parametrize("head, rank, expected", [
    ("default", None, {"classifier.dense": 768 * 768 + 768, "classifier.out_proj": 768 * 4 + 4}),  # 593,668
    ("linear", None, {"classifier.out_proj": 3_076}),
    ("mean", None, {"classifier.out_proj": 3_076}),
    ("lowrank", 16, {"classifier.down": 768 * 16, "classifier.up": 16 * 768 + 768, "classifier.out_proj": 3_076}),
    ("lowrank", None, {"classifier.down": 768 * 16, "classifier.up": 16 * 768 + 768, "classifier.out_proj": 3_076}),
    ("lowrank", 64, {"classifier.down": 768 * 64, "classifier.up": 64 * 768 + 768, "classifier.out_proj": 3_076}),
])
def test_head_counts_on_roberta_base(roberta_base_arch, head, rank, expected):
    b = budget.count(_cfg(roberta_base_arch, head, **{"model.head_rank": rank}), LABELS)
    assert b.head == expected
    lora = 12 * 2 * 8 * (768 + 768)  # default LoRA: r=8 on query and value of all 12 layers
    assert b.lora_total == lora == 294_912
    assert b.trainable == lora + sum(expected.values())
    if head == "linear":
        assert b.head_total == 3_076
    if head == "default":
        assert b.head_total == 593_668


def test_head_rank_only_with_lowrank():
    with pytest.raises(ConfigError, match="head_rank applies only to head 'lowrank'"):
        load_config(None, {"model.head": "linear", "model.head_rank": 8})
    with pytest.raises(ConfigError, match="model.head"):
        load_config(None, {"model.head": "pooled"})
    assert load_config(None, {"model.head": "lowrank"}).model.head_rank is None  # = 16 when built


def _batch(pad_id: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((0, 5), (2, 7)):  # two padded rows
        ids[row, n:] = pad_id
        mask[row, n:] = 0
    return ids, mask


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("which", ["tiny_roberta", "tiny_bert"])
def test_train_step_changes_only_trainable_and_save_load_is_identical(request, tmp_path, which, head):
    model_dir = request.getfixturevalue(which)
    cfg = _cfg(model_dir, head, **({"model.head_rank": 4} if head == "lowrank" else {}))
    mc = load_model_config(cfg.model, LABELS)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.lora, mc)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # The budget's meta-device count is the trained model's count.
    assert budget.count(cfg, LABELS).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = _batch(mc.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(input_ids=ids, attention_mask=mask)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    head_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads.values()), head_grads.keys()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (4, 4)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(load_base(cfg.model, mc), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-5, rtol=1e-4)


def _head_and_hidden(model, ids, mask):
    """The (unwrapped) head module and the backbone's last hidden states."""
    base = model.get_base_model()
    hidden = getattr(base, base.base_model_prefix)(input_ids=ids, attention_mask=mask)[0]
    head = base.classifier.modules_to_save["default"]
    return head, hidden


@pytest.mark.parametrize("which", ["tiny_roberta", "tiny_bert"])
def test_pooling_reads_the_right_tokens(request, which):
    model_dir = request.getfixturevalue(which)
    for head in ("linear", "mean"):
        cfg = _cfg(model_dir, head)
        mc = load_model_config(cfg.model, LABELS)
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.lora, mc).eval()
        ids, mask = _batch(mc.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            h, hidden = _head_and_hidden(model, ids, mask)
            if head == "linear":  # the first token's final hidden state, not BERT's pooler output
                pooled = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1)
            torch.testing.assert_close(logits, h.out_proj(pooled))
            if head == "mean":
                # Padding never changes a row's logits: the same row unpadded gives the same result.
                n = int(mask[0].sum())
                alone = model(input_ids=ids[:1, :n], attention_mask=mask[:1, :n]).logits
                torch.testing.assert_close(alone, logits[:1], atol=1e-5, rtol=1e-4)


def _save_tiny(kind: str, path: Path) -> Path:
    from transformers import (DistilBertConfig, DistilBertModel, GPT2Config, GPT2Model, MPNetConfig, MPNetModel,
                              OPTConfig, OPTModel)

    torch.manual_seed(0)
    if kind == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=80, dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    elif kind == "opt":  # its last hidden state is word_embed_proj_dim wide, not hidden_size (as opt-350m)
        model = OPTModel(OPTConfig(vocab_size=80, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                                   ffn_dim=64, num_attention_heads=2, max_position_embeddings=64, pad_token_id=1,
                                   bos_token_id=0, eos_token_id=2))
    elif kind == "gpt2":
        model = GPT2Model(GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=2, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=0))
    else:
        model = MPNetModel(MPNetConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, pad_token_id=1))
    model.save_pretrained(path)
    return path


def _as_if_trained(model):
    """Every trainable weight random: LoRA B starts at zero, so an untrained adapter would pass a
    save -> load comparison even if its LoRA matrices were never restored."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind, targets, width", [("distilbert", ["q_lin", "v_lin"], 32), ("gpt2", ["c_attn"], 32),
                                                  ("mpnet", ["q", "v"], 32), ("opt", ["q_proj", "v_proj"], 16)])
def test_heads_on_other_architectures(tmp_path, kind, targets, width):
    """DistilBERT (a pre_classifier before its classifier), GPT-2 (``score`` applied per token,
    last token picked by the model), MPNet (q/v names), OPT (hidden states projected to another
    width: the heads were sized by hidden_size, a shape-mismatch traceback): counts agree, logits
    are [batch, classes], save -> load is identical."""
    model_dir = _save_tiny(kind, tmp_path / kind)
    for head in HEADS:
        cfg = _cfg(model_dir, head, **{"lora.target_modules": targets, "lora.r": 2})
        mc = load_model_config(cfg.model, LABELS)
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.lora, mc).eval()
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        b = budget.count(cfg, LABELS)
        assert b.trainable == n_trainable
        _as_if_trained(model)
        if head in ("linear", "mean"):
            assert b.head_total == width * 4 + 4  # DistilBERT's pre_classifier is not trained for nothing
        ids, mask = _batch(1)
        ids[:, 0] = 2  # gpt2: a non-pad first token
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (4, 4)
        if head == "mean":
            n = int(mask[0].sum())
            with torch.no_grad():
                alone = model(input_ids=ids[:1, :n], attention_mask=mask[:1, :n]).logits
            torch.testing.assert_close(alone, logits[:1], atol=1e-5, rtol=1e-4)
        model.save_pretrained(tmp_path / f"{kind}-{head}")
        loaded = load_adapter(load_base(cfg.model, mc), tmp_path / f"{kind}-{head}").eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("head", ["linear", "lowrank"])
def test_first_token_heads_read_the_last_real_token_of_a_causal_model(kind, head):
    """On GPT-2 or Llama the first token has seen nothing else (it is BOS for every Llama text):
    the linear and lowrank heads gave every text the same logits, and plan ranked linear first."""
    from transformers import AutoModelForSequenceClassification, GPT2Config, LlamaConfig

    from loraclf.heads import install_head

    cfg = (GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, pad_token_id=0, num_labels=4) if kind == "gpt2"
           else LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=100, pad_token_id=0, num_labels=4))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    install_head(model, head, cfg, 4 if head == "lowrank" else None)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 60, 70, 0, 0]])  # the same first token; the second is padded
    mask = (ids != 0).long()
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits
    assert not torch.allclose(both[0], both[1])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-4)  # padding after the text changes nothing


def test_mean_head_is_refused_where_the_sequence_is_pooled_between_blocks(tmp_path):
    """Funnel shortens its sequence: mean pooling cut the mask to the pooled length, and the same
    text gave logits 0.5 apart padded and unpadded."""
    from transformers import FunnelConfig, FunnelModel

    from loraclf.errors import ModelError

    FunnelModel(FunnelConfig(vocab_size=80, block_sizes=[1, 1], d_model=32, n_head=2, d_head=16, d_inner=64,
                             pad_token_id=1)).save_pretrained(tmp_path / "funnel")
    cfg = _cfg(tmp_path / "funnel", "mean", **{"lora.target_modules": ["q_head"], "lora.r": 2})
    with pytest.raises(ModelError, match="model.head mean cannot pool Funnel"):
        build_model(cfg.model, cfg.lora, load_model_config(cfg.model, LABELS))
    # any other model that does the same is refused at its first forward, not pooled wrongly
    from loraclf.heads import LinearHead, _Tap

    head = LinearHead(_Tap(), False, 4, 2, 0.0, "mean", 0.02)
    with pytest.raises(ModelError, match="3 hidden states for 5 tokens"):
        head.pool(torch.zeros(1, 3, 4), torch.ones(1, 5))


def test_a_default_head_the_checkpoint_lacks_is_refused(tmp_path):
    """DeBERTa-v2's own head is a pooler (hidden x hidden) plus the classifier. A base checkpoint
    has neither; PEFT trains and saves only the classifier, so the pooler stayed random, frozen and
    unsaved: training reported one accuracy and every later load predicted something else."""
    from transformers import DebertaV2Config, DebertaV2Model

    from loraclf.errors import ModelError

    torch.manual_seed(0)
    DebertaV2Model(DebertaV2Config(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, pad_token_id=1)).save_pretrained(tmp_path / "deberta")
    cfg = _cfg(tmp_path / "deberta", "default", **{"lora.target_modules": ["query_proj", "value_proj"], "lora.r": 2})
    mc = load_model_config(cfg.model, LABELS)
    with pytest.raises(ModelError, match=r"model.head default would leave weights the checkpoint lacks random and "
                                         r"untrained \(pooler.dense.bias, pooler.dense.weight\).*train with model.head linear"):
        load_base(cfg.model, mc)
    # refused by train before the run folder is written (it was left behind, marked failed)
    with pytest.raises(ModelError, match=r"model.head default would leave weights the checkpoint lacks"):
        check_weights(cfg.model, mc)
    cfg = _cfg(tmp_path / "deberta", "linear", **{"lora.target_modules": ["query_proj", "value_proj"], "lora.r": 2})
    check_weights(cfg.model, mc)
    model = _as_if_trained(build_model(cfg.model, cfg.lora, mc).eval())  # the linear head replaces pooler + classifier
    ids, mask = _batch(1)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(load_base(cfg.model, mc), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_head_tap_is_per_thread(tiny_roberta):
    """Two threads running one model at once (a server) each get their own batch's pooling."""
    import threading

    cfg = _cfg(tiny_roberta, "mean")
    mc = load_model_config(cfg.model, LABELS)
    model = build_model(cfg.model, cfg.lora, mc).eval()
    batches = [_batch(mc.pad_token_id, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [model(input_ids=i, attention_mask=m).logits for i, m in batches]
    results: dict[int, list[torch.Tensor]] = {}

    def work(k: int) -> None:
        with torch.no_grad():
            results[k] = [model(input_ids=batches[k][0], attention_mask=batches[k][1]).logits for _ in range(5)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for got in results[k]:
            torch.testing.assert_close(got, expected[k])


# ------------------------------------------------------------------ recipe options (train.py)


def test_label_smoothing_loss():
    from loraclf.train import training_loss

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert torch.allclose(training_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    logp = logits.log_softmax(-1)
    eps = 0.1
    manual = (-(1 - eps) * logp.gather(1, labels[:, None]).squeeze(1) - eps * logp.mean(-1)).mean()
    assert torch.allclose(training_loss(logits, labels, eps), manual)
    assert training_loss(logits.bfloat16(), labels, eps).dtype == torch.float32


def test_loraplus_optimizer_groups(tiny_roberta):
    from loraclf.train import build_optimizer

    cfg = load_config(None, {"model.name_or_path": str(tiny_roberta), "model.head": "linear",
                             "train.learning_rate": 1e-3, "train.loraplus_lr_ratio": 16, "train.weight_decay": 0.01})
    model = build_model(cfg.model, cfg.lora, load_model_config(cfg.model, LABELS))
    opt = build_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert {id(named[n]) for n in trainable} == set(lr_of)  # every trainable tensor, once
    for n in trainable:
        if ".lora_B." in n:
            assert lr_of[id(named[n])] == pytest.approx(16e-3)
        elif ".lora_A." in n or n.endswith("out_proj.weight"):
            assert lr_of[id(named[n])] == pytest.approx(1e-3)
    assert all(g["weight_decay"] in (0.0, 0.01) for g in opt.param_groups)
    plain = build_optimizer(model, cfg.train.model_copy(update={"loraplus_lr_ratio": None}))
    assert [g["lr"] for g in plain.param_groups] == [1e-3]


def test_early_stopping_and_recipe_options_train(tiny_roberta, agnews_files, tmp_path):
    from loraclf.train import train

    out = tmp_path / "run"
    # A learning rate too small to change any prediction: validation accuracy never improves
    # after epoch 1, so patience 1 stops after epoch 2 of 6.
    cfg = load_config(None, tiny_overrides(tiny_roberta, agnews_files, out, **{
        "model.head": "mean", "train.epochs": 6, "train.learning_rate": 1e-12, "train.early_stopping_patience": 1,
        "train.label_smoothing": 0.1, "train.loraplus_lr_ratio": 4, "data.label_names": LABELS}))
    result = train(cfg)
    info = json.loads((out / "run.json").read_text())
    evals = [r for r in result.records if r.get("event") == "eval" and r["split"] == "validation"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert info["stopped_early_at_epoch"] == 2 and info["best_epoch"] == 1 and info["status"] == "complete"
    # the report says so ("best epoch 1 of 6" alone read as if 6 epochs had run)
    assert "best epoch | 1 of 6 (stopped early after epoch 2: early\\_stopping\\_patience 1)" \
        in (out / "report.md").read_text()


def test_a_missing_pooler_matters_only_to_the_default_head(tiny_bert, tmp_path):
    """BERT's pooler feeds only its own head; loraclf's heads read the last hidden states. A
    checkpoint saved without it (add_pooling_layer=False) trains with those heads, and is refused
    with the default head, not as a damaged encoder."""
    from conftest import bert_without_pooler
    from loraclf.errors import ModelError

    bare = bert_without_pooler(tiny_bert, tmp_path / "bert-no-pooler")
    cfg = _cfg(bare, "linear")
    mc = load_model_config(cfg.model, LABELS)
    load_base(cfg.model, mc)
    cfg = _cfg(bare, "default")
    with pytest.raises(ModelError, match=r"model.head default would leave weights the checkpoint lacks random and "
                                         r"untrained \(bert.pooler.dense.bias, bert.pooler.dense.weight\)"):
        load_base(cfg.model, load_model_config(cfg.model, LABELS))


@pytest.mark.parametrize("head", ["linear", "lowrank"])
def test_a_head_sized_otherwise_than_the_hidden_states_says_so(head):
    """A config whose hidden size is not the width the model returns (Reformer returns twice its
    hidden_size) was a matmul shape traceback."""
    from loraclf.errors import ModelError
    from loraclf.heads import LinearHead, LowRankHead, _Tap

    tap = _Tap()
    h = (LinearHead(tap, False, 16, 4, 0.0, "first", 0.02) if head == "linear"
         else LowRankHead(tap, False, 16, 4, 0.0, 2, 0.02))
    tap.put("hidden", torch.zeros(2, 5, 32))
    with pytest.raises(ModelError, match="model.head: the model's hidden states are 32 wide, the head was sized for 16"):
        h(torch.zeros(2, 5, 32))
    tap.put("hidden", torch.zeros(2, 5, 16))
    assert h(torch.zeros(2, 5, 16)).shape == (2, 4)
