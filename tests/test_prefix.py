import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from loraclf.config import LoraSettings, ModelConfig, load_config
from loraclf.data import tokenize
from loraclf.errors import ConfigError
from loraclf.model import build_model, load_model_config, load_tokenizer
from loraclf.prefix import FrozenPrefix
from loraclf.train import train

SEED = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"
NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def _model(path: Path, layers):
    mcfg = ModelConfig(name_or_path=str(path))
    torch.manual_seed(0)
    return build_model(mcfg, LoraSettings(r=4, alpha=8, layers=layers), load_model_config(mcfg, NAMES)), mcfg


@pytest.mark.parametrize("layers, k", [([2, 3], 2), ([3], 3), ([0, 3], None), (None, None)])
def test_prefix_is_the_untrained_bottom(tiny_roberta, layers, k):
    model, _ = _model(tiny_roberta, layers)
    prefix = FrozenPrefix.find(model)
    assert (prefix.k if prefix else None) == k


@pytest.mark.parametrize("fixture, layers", [("tiny_roberta", [2, 3]), ("tiny_bert", [1])])
def test_cached_logits_equal_full_forward(request, fixture, layers):
    path = request.getfixturevalue(fixture)
    model, mcfg = _model(path, layers)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at initialisation
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = tokenize(["war minister says", "goal " * 30, "shares of the bank rose today after profit"],
                   load_tokenizer(mcfg), 128)
    prefix = FrozenPrefix.find(model)
    assert prefix.agrees(ids, 1 if fixture == "tiny_roberta" else 0, torch.device("cpu"), "fp32")
    # and the check is not vacuous: a wrong cache is caught
    store = prefix.compute(ids, 0, 2, torch.device("cpu"), "fp32", ram_bytes=1 << 30)
    store.data[:] += torch.randn(store.data.shape, generator=torch.Generator().manual_seed(0)).numpy()
    model.eval()
    batch = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in ids], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in ids], batch_first=True)
    with torch.no_grad():
        full = model(input_ids=batch, attention_mask=mask).logits
        with prefix.active():
            prefix.feed(store.batch(range(len(ids)), batch.shape[1]))
            wrong = model(input_ids=batch, attention_mask=mask).logits
    assert not torch.allclose(full, wrong, atol=1e-5, rtol=1e-3)


def test_the_self_check_refuses_a_cache_that_does_not_reproduce_the_logits(tiny_roberta, agnews_files, tmp_path,
                                                                           monkeypatch):
    """``agrees`` could return True unconditionally with every test passing: nothing fed it a
    wrong cache. A cache off by noise must fail it, and a run that insists on the cache stop."""
    from loraclf.prefix import PrefixStore

    model, mcfg = _model(tiny_roberta, [2, 3])
    ids = tokenize(["war minister says", "shares of the bank rose today after profit"], load_tokenizer(mcfg), 128)
    prefix = FrozenPrefix.find(model)
    assert prefix.agrees(ids, 1, torch.device("cpu"), "fp32")
    real = PrefixStore.batch
    noise = torch.Generator().manual_seed(0)  # (a constant shift would not do: LayerNorm removes it)
    monkeypatch.setattr(PrefixStore, "batch",
                        lambda self, idx, width: (x := real(self, idx, width)) + torch.randn(x.shape, generator=noise))
    assert not prefix.agrees(ids, 1, torch.device("cpu"), "fp32")
    with pytest.raises(ConfigError, match="train.cache_frozen_prefix: logits with the cache differ"):
        _run(tiny_roberta, agnews_files, tmp_path / "r", **{"train.cache_frozen_prefix": True})


def _run(tiny_roberta, agnews_files, out, **extra):
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, out,
                                           **{"lora.layers": [2, 3], "train.epochs": 2,
                                              "data.max_train_samples": 96, **extra}))
    train(cfg)
    info = json.loads((out / "run.json").read_text())
    return load_file(out / "adapter" / "adapter_model.safetensors"), info


def test_cached_run_equals_uncached_run_with_prefix_in_eval_mode(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    # Whether the real embeddings run in a training step (with gradients on): with the cache
    # in use they must not, or the run only built the cache and computed the prefix anyway.
    with_grad: list[bool] = []
    embed = RobertaEmbeddings.forward
    monkeypatch.setattr(RobertaEmbeddings, "forward",
                        lambda self, *a, **k: with_grad.append(torch.is_grad_enabled()) or embed(self, *a, **k))
    # ram budget 0: the cache is memory-mapped on disk, the path large datasets take
    cached, info_c = _run(tiny_roberta, agnews_files, tmp_path / "cached", **{"train.prefix_cache_ram_mb": 0})
    assert info_c["throughput"]["frozen_prefix_layers"] == 2
    assert with_grad and not any(with_grad)  # the cache pass and the test set ran them, no step did
    assert not list((tmp_path / "cached").glob(".prefix-cache-*"))  # the memory map is deleted
    plain, info_p = _run(tiny_roberta, agnews_files, tmp_path / "plain", **{"train.cache_frozen_prefix": False})
    assert info_p["throughput"]["frozen_prefix_layers"] == 0
    monkeypatch.setattr(FrozenPrefix, "skip", False)  # prefix in eval mode, computed every step
    with_grad.clear()
    reference, info_r = _run(tiny_roberta, agnews_files, tmp_path / "reference")
    assert info_r["throughput"]["frozen_prefix_layers"] == 0
    assert any(with_grad)  # the check above can fail: without the cache every step runs them

    assert cached.keys() == reference.keys()
    for k in cached:
        torch.testing.assert_close(cached[k], reference[k], atol=2e-5, rtol=1e-4)
    for split in ("validation", "test"):
        assert info_c["metrics"][split]["accuracy"] == info_r["metrics"][split]["accuracy"]
        assert info_c["metrics"][split]["loss"] == pytest.approx(info_r["metrics"][split]["loss"], abs=1e-4)
    # ... while dropout in the prefix (caching off) trains a different adapter: the test can fail
    assert any(not torch.allclose(plain[k], reference[k], atol=1e-4) for k in plain)


def test_cache_requested_where_nothing_is_frozen_is_refused_before_anything_is_written(
        tiny_roberta, agnews_files, tmp_path):
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r",
                                           **{"lora.layers": [0, 1], "train.cache_frozen_prefix": True}))
    with pytest.raises(ConfigError, match="no frozen prefix") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()


def test_spill_file_is_removed_when_the_pass_fails(tiny_roberta, tmp_path):
    """An error (or a second Ctrl-C) during the prefix pass must not leave a dataset-sized
    memory-mapped file in the run folder; a finished store leaves one until closed."""
    model, mcfg = _model(tiny_roberta, [2, 3])
    prefix = FrozenPrefix.find(model)
    ids = tokenize(["war minister says", "goal " * 30, "shares rose"], load_tokenizer(mcfg), 128)
    store = prefix.compute(ids, 1, 2, torch.device("cpu"), "fp32", ram_bytes=0, spill_parent=tmp_path)
    assert [p.name for p in tmp_path.glob(".prefix-cache-*/*")] == ["hidden.npy"]
    store.close()
    assert not list(tmp_path.iterdir())
    bad = [ids[0], [0, 10_000, 2]]  # a token id past the vocabulary: the embedding lookup fails
    with pytest.raises(IndexError):
        prefix.compute(bad, 1, 1, torch.device("cpu"), "fp32", ram_bytes=0, spill_parent=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_disk_too_small_for_the_spill_file_is_an_error_naming_it(tiny_roberta, tmp_path, monkeypatch):
    """The memory map was a sparse file: on a full disk, writing through it killed training with
    SIGBUS (no message, run.json left "running", the disk still full). The space is now reserved
    first, so the disk's refusal is an OSError naming the file, and the folder is removed."""
    import errno
    import os
    import subprocess
    import sys

    model, mcfg = _model(tiny_roberta, [2, 3])
    prefix = FrozenPrefix.find(model)
    ids = tokenize(["war minister says", "goal " * 30, "shares rose"], load_tokenizer(mcfg), 128)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as e:
        prefix.compute(ids, 1, 2, torch.device("cpu"), "fp32", ram_bytes=0, spill_parent=tmp_path)
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("hidden.npy")
    assert not list(tmp_path.iterdir())
    # a file size limit (ulimit -f) stops the map's creation itself: named too, nothing left
    code = (f"import resource, sys, torch; sys.path[:0] = {sys.path!r}; from test_prefix import _model; "
            f"from loraclf.prefix import FrozenPrefix; m, _ = _model({str(tiny_roberta)!r}, [2, 3]); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); "
            f"FrozenPrefix.find(m).compute({ids!r}, 1, 2, torch.device('cpu'), 'fp32', 0, "
            f"__import__('pathlib').Path({str(tmp_path)!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode != 0 and "File too large" in done.stderr and "hidden.npy" in done.stderr.splitlines()[-1]
    assert not list(tmp_path.iterdir())


def _other_arch(tiny_roberta: Path, dest: Path, kind: str) -> Path:
    """A tiny random DeBERTa-v2 or ELECTRA-small-shaped model (embeddings narrower than the
    layers) with the tiny RoBERTa's tokenizer."""
    import shutil

    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model, ElectraConfig, ElectraModel

    shutil.copytree(tiny_roberta, dest, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    common = dict(vocab_size=len(AutoTokenizer.from_pretrained(tiny_roberta)), hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=2, intermediate_size=64, pad_token_id=1, max_position_embeddings=130)
    torch.manual_seed(0)
    model = (DebertaV2Model(DebertaV2Config(**common)) if kind == "deberta"
             else ElectraModel(ElectraConfig(**common, embedding_size=16)))
    model.save_pretrained(dest)
    return dest


@pytest.mark.parametrize("kind, targets, cached", [("deberta", ["query_proj", "value_proj"], 2),
                                                  ("electra-small", ["query", "value"], 0)])
def test_other_architectures_cache_or_fall_back_without_failing(kind, targets, cached, tiny_roberta, agnews_files,
                                                                tmp_path):
    """DeBERTa-v2's layers return (hidden, attentions) and its encoder unpacks two values: the
    stand-in layers returned one and training died with a traceback. ELECTRA-small projects its
    embeddings before layer 0, so the cache does not fit: the self-check raised instead of
    saying no. Now DeBERTa caches, and ELECTRA-small trains uncached (or, asked to cache, is
    refused in one line)."""
    model = _other_arch(tiny_roberta, tmp_path / kind, kind)
    extra = {"lora.target_modules": targets, "model.head": "linear", "train.epochs": 1}
    _, info = _run(model, agnews_files, tmp_path / "run", **extra)
    assert info["status"] == "complete" and info["throughput"]["frozen_prefix_layers"] == cached
    if cached:
        reference_path = tmp_path / "reference"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(FrozenPrefix, "skip", False)
            _, info_r = _run(model, agnews_files, reference_path, **extra)
        assert info["metrics"]["validation"]["loss"] == pytest.approx(info_r["metrics"]["validation"]["loss"],
                                                                      abs=1e-4)
    else:
        with pytest.raises(ConfigError, match="logits with the cache differ"):
            _run(model, agnews_files, tmp_path / "forced", **extra, **{"train.cache_frozen_prefix": True})


def test_validation_cache_is_not_charged_for_a_training_cache_on_disk(tiny_roberta, tmp_path):
    """The validation rows' RAM allowance subtracted the training cache's size also when that
    cache was memory-mapped on disk (using no RAM): the small validation cache went to disk too."""
    from types import SimpleNamespace

    from loraclf.train import _frozen_prefix

    model, _ = _model(tiny_roberta, [2, 3])
    train_ids = [[0] + [7] * 40 + [2]] * 200  # 200 x 42 tokens x 32 floats x 4 B = 1.03 MiB
    val_ids = [[0] + [7] * 40 + [2]] * 10  # 52 KiB
    tc = SimpleNamespace(cache_frozen_prefix=None, prefix_cache_ram_mb=1, eval_batch_size=32)
    _, train_store, val_store = _frozen_prefix(model, tc, train_ids, val_ids, 1, torch.device("cpu"), "fp32", tmp_path)
    try:
        assert train_store.spill_dir is not None and val_store.spill_dir is None
    finally:
        train_store.close()
        val_store.close()
