"""Base encoder + classification head + PEFT LoRA; base frozen; merge for inference.

The same builder serves three callers: the budget (on the ``meta`` device, no weights),
training (real weights) and loading a finished run (adapter on top of the base).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig,
                          PreTrainedTokenizerFast)
from transformers.utils import cached_file

from .config import LoraSettings, ModelConfig
from .data import file_fingerprint
from .errors import ModelError, brief, first_few
from .heads import install_head, peft_trains
from .runs import unreadable_safetensors

def _offline_fix() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        # it was the reason, not a cure: the model is in no local cache
        return ("pass --model.name_or_path a local model directory, or unset HF_HUB_OFFLINE and connect to the "
                "Hugging Face Hub to download it")
    return ("pass --model.name_or_path a local model directory, or connect to the Hugging Face Hub "
            "(set HF_HUB_OFFLINE=1 to fail fast when offline)")


def resolve_name(name_or_path: str) -> str:
    """Local directories become absolute, so a run keeps working from any working directory."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.is_dir() else name_or_path


def _local_base(mcfg: ModelConfig) -> Path | None:
    """The base model's folder when ``name_or_path`` is one here; None for a hub name."""
    folder = Path(mcfg.name_or_path).expanduser()
    return folder if folder.is_dir() else None


def hub_commit(mcfg: ModelConfig) -> str | None:
    """The Hub commit that a hub name at ``model.revision`` (None: main; a branch, tag or commit)
    resolves to now: a run records it as its revision, so that evaluate, predict and serve load
    the base weights it was trained on even after the repository moves on. None for a local
    folder, and where the resolved file is not in a Hub cache snapshot (the run then records the
    revision as given)."""
    if _local_base(mcfg) is not None:
        return None
    try:
        # transformers' own resolution (cache, offline mode, token), so the commit is the one it loads
        found = cached_file(mcfg.name_or_path, "config.json", revision=mcfg.revision)
    except (OSError, ValueError):
        return None
    folder = Path(found).parent if found else None
    if folder is None or folder.parent.name != "snapshots" or not re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return None
    return folder.name


def base_fingerprint(mcfg: ModelConfig) -> dict[str, dict[str, Any]] | None:
    """A local base folder's config and weight files, by name: bytes, sha256 and mtime_ns (the
    last only to skip hashing again while a file is untouched). None for a hub name, which a run
    pins by its commit instead (:func:`hub_commit`)."""
    folder = _local_base(mcfg)
    if folder is None:
        return None
    return {p.name: {**{k: v for k, v in file_fingerprint(p).items() if k != "path"}, "mtime_ns": p.stat().st_mtime_ns}
            for p in _base_files(folder, mcfg.trust_remote_code)}


def _base_files(folder: Path, remote_code: bool) -> list[Path]:
    """What from_pretrained reads of a local base, the tokenizer aside (a run keeps its own copy),
    in transformers' order with use_safetensors (as :func:`load_base` loads): config.json and
    model.safetensors, else model.safetensors.index.json and the shards its weight_map names;
    with trust_remote_code, the model's code too. Other files (a Trainer's training_args.bin,
    PyTorch .bin weights, shards beside a model.safetensors) may come and go."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    weights = [single] if single.is_file() else [index]
    if not single.is_file() and index.is_file():
        try:
            weights += [folder / name for name in set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable index: loading will say so; the index itself is fingerprinted
    code = list(folder.glob("*.py")) if remote_code else []
    return sorted(p for p in {folder / "config.json", *weights, *code} if p.is_file())


def base_changes(mcfg: ModelConfig, recorded: dict[str, dict[str, Any]]) -> list[str]:
    """The files of a local base folder that are not as ``recorded`` by :func:`base_fingerprint`:
    gone, added, or with other content (hashed only where size or modification time moved, so a
    folder copied elsewhere is compared by content and an untouched one costs no reading). []
    for a hub name, and for a folder that is not there (loading it says so)."""
    folder = _local_base(mcfg)
    if folder is None:
        return []
    now = {p.name: p for p in _base_files(folder, mcfg.trust_remote_code)}
    changed = sorted(set(now) ^ set(recorded))
    for name in sorted(set(now) & set(recorded)):
        then, st = recorded[name], now[name].stat()
        if st.st_size != then.get("bytes"):
            changed.append(name)
        elif st.st_mtime_ns != then.get("mtime_ns") and file_fingerprint(now[name])["sha256"] != then.get("sha256"):
            changed.append(name)
    return changed


def check_base(mcfg: ModelConfig, recorded: dict[str, dict[str, Any]] | None, run_dir: Path) -> None:
    """Refuse a local base folder whose files changed since the run trained on it: the adapter
    would be applied to other weights, and its predictions would change without a word."""
    changed = base_changes(mcfg, recorded) if recorded else []
    if changed:
        raise ModelError(f"the base model differs from the one the run trained on ({first_few(changed)} changed "
                         "since)", where=mcfg.name_or_path,
                         fix=f"restore the base model the run trained on, or point model.name_or_path in "
                             f"{run_dir / 'config.yaml'} at a copy of it (the files are compared by content)")


def _load_error(what: str, mcfg: ModelConfig, e: Exception) -> ModelError:
    msg = brief(e)
    if "trust_remote_code" in str(e):
        return ModelError(f"{what} '{mcfg.name_or_path}' needs its own code to run", where="model.name_or_path",
                          fix="review the model's code, then set --model.trust_remote_code true")
    local = Path(mcfg.name_or_path).expanduser()
    if local.exists():
        return ModelError(f"cannot load {what} from '{local}' ({msg[:200]})", where="model.name_or_path",
                          fix="point --model.name_or_path at a directory with config.json, tokenizer files and *.safetensors")
    if mcfg.name_or_path.startswith(("/", ".", "~")):  # a path, never a hub name: the hub's error would mislead
        return ModelError(f"model directory '{local}' does not exist", where="model.name_or_path",
                          fix="check the path; a run records its base model's absolute path, so for a run whose base "
                              "model moved, restore it there or set model.name_or_path in the run's config.yaml")
    if mcfg.revision:  # a run's pinned commit may be all that is missing
        return ModelError(f"cannot load {what} '{mcfg.name_or_path}' at revision {mcfg.revision}: not a local "
                          f"directory, and that revision is not reachable on the Hugging Face Hub ({msg[:160]})",
                          where="model.revision", fix="connect to the Hugging Face Hub to download that revision "
                          "(a run records the commit it trained on), or pass --model.name_or_path a local copy of it")
    return ModelError(f"cannot load {what} '{mcfg.name_or_path}': not a local directory and not reachable on the "
                      f"Hugging Face Hub ({msg[:160]})", where="model.name_or_path", fix=_offline_fix())


def load_model_config(mcfg: ModelConfig, label_names: list[str]) -> PretrainedConfig:
    """The architecture config with the classifier sized and named for ``label_names``."""
    try:
        return AutoConfig.from_pretrained(
            resolve_name(mcfg.name_or_path),
            revision=mcfg.revision,
            trust_remote_code=mcfg.trust_remote_code,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("model config", mcfg, e) from None


def load_tokenizer(mcfg: ModelConfig, path: str | None = None) -> Any:
    """The model's tokenizer (``path``: a run's saved copy instead)."""
    source = path or resolve_name(mcfg.name_or_path)
    revision = None if path else mcfg.revision
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=mcfg.trust_remote_code)
        except ValueError as e:
            if "does not exist or is not currently imported" not in str(e):
                raise
            # A tokenizer class this transformers lacks: transformers 5 saves a generic fast
            # tokenizer as "TokenizersBackend", which 4.x does not know. Its tokenizer.json is all
            # a fast tokenizer needs, so a run trained on 5.x still loads on 4.x. Without one the
            # class is the problem to report, not what the fallback trips over.
            try:
                with _quiet("transformers.tokenization_utils_base"):  # "... is not the same type" (4.x)
                    tokenizer = PreTrainedTokenizerFast.from_pretrained(source, revision=revision)
            except (OSError, ValueError, KeyError, TypeError, ImportError):
                raise e from None
    # ImportError: transformers 4 reports a folder without vocabulary files as a missing protobuf
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        unknown = _unknown_tokenizer_class(Path(source))
        if unknown:
            import transformers

            raise ModelError(f"tokenizer class '{unknown}' (tokenizer_config.json) is not in transformers "
                             f"{transformers.__version__}, and there is no tokenizer.json to load instead",
                             where=str(path) if path else "model.name_or_path",
                             fix="install the transformers release that saved it, or add the model's tokenizer.json "
                                 "to the folder") from None
        if path is not None:  # a run's own copy: the run is damaged, not the base model
            raise ModelError(f"cannot load the run's tokenizer ({brief(e, 160)})",
                             where=str(path), fix="restore the run's tokenizer folder from a copy, or train again") from None
        folder = Path(source)
        if folder.is_dir() and not any(_is_vocabulary_file(f.name) for f in folder.iterdir()):
            raise _no_vocabulary(source, "has no vocabulary files", "model.name_or_path") from None
        raise _load_error("tokenizer", mcfg, e) from None
    # A folder without tokenizer files loads (transformers 5) as a tokenizer of special tokens
    # only, which turns every text into <s></s> (or [UNK]s): a run would train to chance and call
    # itself complete.
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise _no_vocabulary(source, f"has no vocabulary beyond its {len(tokenizer)} special tokens",
                             "model.name_or_path" if path is None else str(path))
    return tokenizer


def _unknown_tokenizer_class(folder: Path) -> str | None:
    """The tokenizer class a local ``folder`` names that this transformers lacks, when there is no
    tokenizer.json to fall back on (transformers 4 reports it as a missing protobuf, 5 as a
    backend it "couldn't instantiate")."""
    import json

    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        conf = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = conf.get("tokenizer_class") if isinstance(conf, dict) and "auto_map" not in conf else None
    if not isinstance(name, str) or (folder / "tokenizer.json").is_file() or tokenizer_class_from_name(name):
        return None
    return name


def _is_vocabulary_file(name: str) -> bool:
    """A file a tokenizer takes its vocabulary from: tokenizer.json, vocab/merges files (BPE,
    WordPiece), sentencepiece models."""
    return name == "tokenizer.json" or name.startswith(("vocab", "merges")) or name.endswith((".model", ".tiktoken"))


def _no_vocabulary(source: str, what: str, where: str) -> ModelError:
    return ModelError(f"the tokenizer of '{source}' {what} (tokenizer files missing?)", where=where,
                      fix="add the model's tokenizer files (tokenizer.json, or vocab/merges files) to the folder")


# Architectures whose position ids start after the padding index (fairseq's convention):
# position i is embedding pad_token_id + 1 + i, so 514 embeddings hold 512 tokens.
_PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer",
                             "data2vec-text", "roberta-prelayernorm", "xmod", "ibert"}


def usable_length(max_length: int, config: PretrainedConfig | None) -> int:
    """``max_length`` (tokens, special ones included) capped at what the model's position
    embeddings hold. The tokenizer's ``model_max_length`` usually says the same, but some
    tokenizers do not set it, and a batch padded to a multiple must not pass it either: an index
    past the position table fails deep inside the forward."""
    positions = getattr(config, "max_position_embeddings", None)
    if config is None or not isinstance(positions, int) or positions <= 0:
        return max_length  # relative or rotary positions: no table to overrun
    if config.model_type in _PADDING_OFFSET_POSITIONS:
        positions -= (config.pad_token_id if isinstance(config.pad_token_id, int) else 1) + 1
    return max(2, min(max_length, positions))


def num_layers(config: PretrainedConfig) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise ModelError(f"cannot tell how many layers a '{config.model_type}' model has", where="lora.layers",
                     fix="leave lora.layers unset (null) to adapt every layer")


def check_layers(lcfg: LoraSettings, config: PretrainedConfig) -> None:
    if lcfg.layers is None:
        return
    n = num_layers(config)
    bad = [i for i in lcfg.layers if i >= n]
    if bad:
        raise ModelError(f"layer(s) {bad} do not exist: the model has {n} layers (0..{n - 1})", where="lora.layers",
                         fix=f"choose layer indices below {n}")


def peft_config(lcfg: LoraSettings, layers_pattern: list[str] | None = None, revision: str | None = None) -> LoraConfig:
    """PEFT's LoraConfig for ``lcfg``. ``layers_pattern``: the names of the ModuleLists of blocks
    (``layer``, ``layers``, ``h``), which tell PEFT where the layer index of a module name is.
    ``revision``: the base model's (adapter_config.json records it, so that PEFT's own loaders,
    AutoPeftModel..., load the base the adapter was trained on)."""
    return LoraConfig(
        revision=revision,
        task_type=TaskType.SEQ_CLS,  # marks the classifier as trained (modules_to_save) and saved with the adapter
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=list(lcfg.target_modules),
        layers_to_transform=list(lcfg.layers) if lcfg.layers is not None else None,
        layers_pattern=layers_pattern if lcfg.layers is not None else None,
        use_rslora=lcfg.use_rslora,
        use_dora=lcfg.use_dora,
        rank_pattern=dict(lcfg.rank_pattern or {}),
        alpha_pattern=dict(lcfg.alpha_pattern or {}),
        exclude_modules=list(lcfg.exclude_modules) if lcfg.exclude_modules else None,
    )


def is_linear(module: torch.nn.Module) -> bool:
    """A layer PEFT's LoRA adapts as a linear map: nn.Linear or GPT-2 style Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def find_block_lists(model: torch.nn.Module, n: int) -> list[str]:
    """Dotted names of the ModuleLists of ``n`` repeated layers, outermost first: one for most
    models (``roberta.encoder.layer``), one per stack for encoder-decoders, two for XLM, which
    keeps each layer's attention and feed-forward in parallel lists (``attentions``, ``ffns``).
    A list inside a found one (``n`` experts of an MoE layer) is not a list of layers."""
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and n > 0:
            if any(is_linear(m) for m in module[0].modules()) and not any(name.startswith(f + ".") for f in found):
                found.append(name)
    return found


def find_blocks(model: torch.nn.Module, n: int) -> str:
    """Dotted name of the (first) ModuleList holding the ``n`` repeated layers (``...encoder.layer``)."""
    found = find_block_lists(model, n)
    if not found:
        raise ModelError(f"cannot find the {n} repeated blocks of a '{type(model).__name__}'",
                         where="model.name_or_path", fix="set lora.* by hand and check it with loraclf params")
    return found[0]


def compile_in_place(model: torch.nn.Module, mode: str = "default") -> None:
    """torch.compile each repeated block (or, failing that, the whole model) in place with
    ``Module.compile``: parameter names stay as they are, so checkpoints and the saved adapter
    are the same as an eager run's (wrapping in OptimizedModule would add ``_orig_mod.`` to every
    key and break loading). Dynamic shapes, because every length-grouped batch has its own.
    ``mode``: torch.compile's ("reduce-overhead" adds CUDA graphs, one recorded per shape)."""
    try:
        blocks = dict(model.named_modules())[find_blocks(model, num_layers(model.config))]
    except ModelError:
        model.compile(dynamic=True, mode=mode)
        return
    for block in blocks:
        block.compile(dynamic=True, mode=mode)


def _matches(name: str, suffix: str) -> bool:
    """PEFT's rule for target_modules / exclude_modules given as a list: the name or a dotted suffix."""
    return name == suffix or name.endswith("." + suffix)


def _check_targets(model: torch.nn.Module, lcfg: LoraSettings) -> None:
    names = [n for n, m in model.named_modules() if is_linear(m)]
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in names})
    missing = [t for t in lcfg.target_modules if not any(_matches(n, t) for n in names)]
    if missing:
        raise ModelError(f"target module(s) {missing} not found in the model", where="lora.target_modules",
                         fix=f"use names (or dotted name suffixes) of its linear layers: {leaf_names}")

    # PEFT adapts nothing there (BERT's "classifier": a silent no-op) or fails with a TypeError
    # (DistilBERT's "pre_classifier", which it would wrap twice)
    head_only = [t for t in lcfg.target_modules if all(_in_head(n) for n in names if _matches(n, t))]
    if head_only:
        raise ModelError(f"target module(s) {head_only} are in the classification head, which is trained whole "
                         "(not through LoRA)", where="lora.target_modules",
                         fix="target encoder layers only; the head's size is set by model.head")
    # a misspelt exclusion would silently adapt what the user meant to keep frozen
    every = [n for n, _ in model.named_modules()]
    problems = [f"exclude_modules entry {x!r} matches no module" for x in lcfg.exclude_modules or []
                if not any(_matches(n, x) for n in every)]
    if problems:
        raise ModelError("; ".join(problems), where="lora",
                         fix=f"match the end of module names, e.g. 'intermediate.dense' (linear layers: {leaf_names})")


def _check_patterns(model: PeftModel, lcfg: LoraSettings) -> None:
    """Every rank_pattern / alpha_pattern key must match a module LoRA adapts: a misspelt key, or
    one naming a layer outside target_modules / lora.layers, changed nothing, and the budget was
    counted at a rank the user did not mean."""
    # the names PEFT matches keys against: the base model's, without the wrapper's prefix (a key
    # written with it matched here, and PEFT ignored it)
    adapted = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")]
    problems = [f"{field} key '{key}' matches no module LoRA adapts" for field in ("rank_pattern", "alpha_pattern")
                for key in getattr(lcfg, field) or {}
                if not any(re.match(rf"(.*\.)?({key})$", n) for n in adapted)]  # PEFT's matching rule
    if problems:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
        raise ModelError("; ".join(problems), where="lora",
                         fix=f"match the end of an adapted module's name, e.g. 'intermediate.dense' (adapted: {leaves})")


def skeleton(mcfg: ModelConfig, config: PretrainedConfig, head: str, head_rank: int | None) -> torch.nn.Module:
    """The sequence-classification model of ``config`` with ``head`` installed, on the meta
    device: the layout and parameter counts, no weights, no memory."""
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=mcfg.trust_remote_code)
    # what transformers raises for a config it has no such model for (ViT), or cannot build (an
    # AssertionError from torch: a pad_token_id beyond vocab_size)
    except (ValueError, TypeError, KeyError, ImportError, AttributeError, AssertionError) as e:
        raise ModelError(f"cannot build a sequence-classification model from the config of '{mcfg.name_or_path}' "
                         f"({brief(e, 200)})", where="model.name_or_path",
                         fix="use a text encoder that transformers' AutoModelForSequenceClassification supports, "
                             "with a consistent config.json") from None
    install_head(model, head, config, head_rank)
    return model


def build_model(mcfg: ModelConfig, lcfg: LoraSettings, config: PretrainedConfig, meta: bool = False) -> PeftModel:
    """Base model + LoRA with only LoRA and the head trainable. ``meta``: no weights, no memory."""
    check_layers(lcfg, config)
    if meta:
        base = skeleton(mcfg, config, mcfg.head, mcfg.head_rank)
    else:
        base = load_base(mcfg, config)
    _check_targets(base, lcfg)
    try:
        # LoRA matrices on the meta device too: counting an oversized rank must not allocate it
        with _quiet_peft(), torch.device("meta") if meta else contextlib.nullcontext():
            model = get_peft_model(base, peft_config(lcfg, _layers_pattern(base, config, lcfg), mcfg.revision))
    except (ValueError, TypeError) as e:  # PEFT's NoMatchingPeftModuleError and its other refusals of a LoraConfig
        if "no modules were targeted" in str(e).lower():
            layers = "every layer" if lcfg.layers is None else f"lora.layers {list(lcfg.layers)}"
            excluded = f", outside lora.exclude_modules {list(lcfg.exclude_modules)}" if lcfg.exclude_modules else ""
            raise ModelError(f"LoRA would adapt nothing: no linear layer matches lora.target_modules "
                             f"{list(lcfg.target_modules)} in {layers}{excluded}", where="lora",
                             fix="widen lora.layers or lora.target_modules, or narrow lora.exclude_modules (a model "
                                 "may share one block across its layers, as ALBERT does)") from None
        raise ModelError(f"PEFT refused the LoRA settings ({brief(e, 200)})", where="lora",
                         fix="check lora.* against PEFT's LoraConfig") from None
    _check_patterns(model, lcfg)
    return model


def _layers_pattern(model: torch.nn.Module, config: PretrainedConfig, lcfg: LoraSettings) -> list[str] | None:
    """The block lists' own names, for lora.layers: without them PEFT before 0.18 takes the *last*
    number in a module's name as its layer, so on a model with numbered parts inside its blocks
    ("layers.1.mlp.experts.0.gate_proj", T5's "block.1.layer.0...") lora.layers chose experts or
    sub-layers instead of layers. Every list, not the first: XLM's feed-forward layers live in
    ``ffns``, beside ``attentions``."""
    if lcfg.layers is None:
        return None
    names = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in find_block_lists(model, num_layers(config))))
    return names or None  # no block list found: PEFT's own rule


def load_trained(model: torch.nn.Module, trained: dict[str, torch.Tensor], where: str | Path) -> None:
    """A checkpoint's trained tensors into ``model``, which must train exactly those (names and
    shapes): with ``strict=False`` alone (the frozen weights are not in it) LoRA on other modules
    loaded nothing and went on from initial values, another rank was a RuntimeError traceback."""
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    problem = None
    if set(want) != set(trained):
        problem = f"it holds {first_few(sorted(set(trained) - set(want))) or 'nothing more'}, the model trains " \
                  f"{first_few(sorted(set(want) - set(trained))) or 'nothing more'}"
    else:
        shapes = [f"{n} {list(t.shape)} vs {list(want[n].shape)}" for n, t in trained.items() if t.shape != want[n].shape]
        if shapes:  # another rank or head size
            problem = f"shapes differ, checkpoint vs model: {first_few(shapes, 2)}"
    if problem:
        raise ModelError(f"the checkpoint does not fit the model config.yaml describes ({problem})", where=str(where),
                         fix="restore config.yaml as the run was trained, or train a new run")
    model.load_state_dict(trained, strict=False)  # the frozen weights are not in it


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors (LoRA + head): what the best epoch keeps."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter(base: torch.nn.Module, adapter_dir: Path) -> PeftModel:
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelError("adapter weights missing (adapter_model.safetensors)", where=str(adapter_dir),
                         fix="train the run again; loraclf reads adapter weights from safetensors only")
    settings = adapter_dir / "adapter_config.json"
    try:  # read here first: PEFT fails on a file cut short with a traceback (JSONDecodeError, KeyError)
        peft_type = json.loads(settings.read_text(encoding="utf-8")).get("peft_type")
    except FileNotFoundError:
        raise ModelError("adapter settings missing (adapter_config.json)", where=str(adapter_dir),
                         fix="restore the file from a copy, or train the run again") from None
    except (ValueError, AttributeError):  # not JSON, not UTF-8, or not a JSON object
        peft_type = None
    if peft_type is None:
        raise ModelError("adapter settings are damaged (not PEFT's JSON object with a peft_type)", where=str(settings),
                         fix="restore the file from a copy, or train the run again")
    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(base, str(adapter_dir), use_safetensors=True)
    except SafetensorError as e:
        raise ModelError(f"adapter weights are damaged ({brief(e, 120)})",
                         where=str(adapter_dir / "adapter_model.safetensors"),
                         fix="restore the file from a copy, or train the run again") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        # settings edited after training (another rank or target_modules): PEFT builds another
        # adapter than the weights hold; other RuntimeErrors (out of memory) are not about the files
        if isinstance(e, RuntimeError) and "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        raise ModelError(f"the adapter's settings do not match its weights or the model ({brief(e, 160)})",
                         where=str(adapter_dir), fix="restore adapter_config.json and adapter_model.safetensors "
                         "as training wrote them, or train the run again") from None


def check_weights(mcfg: ModelConfig, config: PretrainedConfig) -> None:
    """The weights would load as :func:`load_base` loads them: checked before a run folder is
    written, so that a folder without weights, a truncated file or a checkpoint that lacks part
    of the model fails a run before it starts, not after its directory exists. A local folder's
    files are read for their headers only; the checkpoint is matched to the model on the meta
    device (no tensors read). A hub model is downloaded here, as training would next."""
    local = Path(mcfg.name_or_path).expanduser()
    if local.is_dir():
        files = sorted(local.glob("*.safetensors"))
        if not files:
            raise ModelError("no *.safetensors weights in the model folder", where=str(local),
                             fix="add the model's safetensors weights (loraclf never reads pickle .bin files)")
        if (bad := unreadable_safetensors(files)) is not None:
            raise ModelError(f"weights file is damaged ({brief(bad[1], 120)})", where=str(bad[0]),
                             fix="download or copy the model's weights again")
    _pretrained(mcfg, config, meta=True)


def load_base(mcfg: ModelConfig, config: PretrainedConfig) -> torch.nn.Module:
    """Pretrained weights with the configured head installed: what training adapts and what a
    run's adapter (which holds the trained head) is loaded onto."""
    base = _pretrained(mcfg, config)
    install_head(base, mcfg.head, config, mcfg.head_rank)
    return base


def _load(mcfg: ModelConfig, config: PretrainedConfig, meta: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """The checkpoint loaded (``meta``: matched only, no tensors) and the weights it lacks that
    nothing would train (:func:`_untrained`)."""
    try:
        with _held_load_report():
            base, loading = AutoModelForSequenceClassification.from_pretrained(
                resolve_name(mcfg.name_or_path), config=config, revision=mcfg.revision,
                trust_remote_code=mcfg.trust_remote_code, use_safetensors=True,
                # fp32 master weights whatever the checkpoint's dtype: precision is autocast's job.
                dtype=torch.float32, output_loading_info=True, **({"device_map": "meta"} if meta else {}),
            )
    except (OSError, ValueError, SafetensorError) as e:
        raise _load_error("model", mcfg, e) from None
    return base, _untrained(loading.get("missing_keys") or [])


def has_local_weights(mcfg: ModelConfig) -> bool:
    """Whether ``model.name_or_path`` is a local folder with weights (not a hub name, nor a folder
    of config and tokenizer only)."""
    local = Path(mcfg.name_or_path).expanduser()
    return local.is_dir() and any(local.glob("*.safetensors"))


def default_head_gaps(mcfg: ModelConfig, config: PretrainedConfig) -> list[str]:
    """The weights that the model's own head (``model.head: default``) would need and a local
    checkpoint lacks, matched on the meta device. Empty where nothing can be said without a
    download (a hub name) or without weights (a folder of config and tokenizer only, which the
    planner counts on), and where the folder cannot be read: training reports that."""
    if not has_local_weights(mcfg):
        return []
    try:
        return _load(mcfg, config, meta=True)[1]
    except ModelError:
        return []


def check_default_head(mcfg: ModelConfig, config: PretrainedConfig) -> None:
    """Train's refusal of ``model.head: default`` where a local checkpoint lacks head weights
    beyond the classifier, for the commands that only count (``params``): they must not pass a
    config that train refuses. Nothing to say without local weights."""
    if mcfg.head == "default":
        _check_default_head(mcfg, default_head_gaps(mcfg, config))


def _pretrained(mcfg: ModelConfig, config: PretrainedConfig, meta: bool = False) -> torch.nn.Module:
    """The checkpoint loaded (``meta``: matched only, no tensors), refused where it lacks weights
    that nothing would train."""
    base, untrained = _load(mcfg, config, meta)
    _check_encoder(mcfg, base.base_model_prefix, untrained)
    if mcfg.head == "default":
        _check_default_head(mcfg, untrained)
    return base


_MODELING_LOGGER = logging.getLogger("transformers.modeling_utils")


# What transformers says of every load of a classifier: the LOAD REPORT (5.x), "Some weights ...
# were not initialized ... newly initialized" and "... were not used when initializing" (4.x)
_LOAD_REPORTS = ("LOAD REPORT", "were not initialized from the model checkpoint", "were not used when initializing")


@contextlib.contextmanager
def _held_load_report() -> Iterator[None]:
    """Hold back transformers' load report, which calls the classification head missing and
    "newly initialized" on every load: the head is new when training starts and comes from the
    adapter when a run is loaded, so the report would tell a Python user their trained classifier
    is random. Weights missing anywhere else are an error (:func:`_check_encoder`), not a report.
    The "Loading weights" progress bar (5.x) is off too: a load is seconds, and a library's
    output is its caller's (the CLI turns all of transformers' bars off)."""
    from transformers.utils import logging as hf_logging

    class Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(s in record.getMessage() for s in _LOAD_REPORTS)

    hold, bars = Hold(), hf_logging.is_progress_bar_enabled()
    _MODELING_LOGGER.addFilter(hold)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        _MODELING_LOGGER.removeFilter(hold)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger`` says nothing below ERROR inside the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing``; the FutureWarning is
    addressed to PEFT, not to loraclf's users. PEFT's warning that a rank_pattern / alpha_pattern
    key matched nothing reached stderr although :func:`_check_patterns` then refuses the
    configuration with its own error line (the library prints nothing)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*",
                                category=RuntimeWarning)
        yield


def _untrained(missing: Iterable[str]) -> list[str]:
    """The missing weight names outside every module PEFT trains (the key's own or an enclosing
    one): weights that would stay as initialised."""
    return sorted(k for k in missing if not ("." in k and _in_head(k.rsplit(".", 1)[0])))


def _in_head(module_name: str) -> bool:
    """Whether PEFT trains the module whole (modules_to_save): the module itself or a parent."""
    parts = module_name.split(".")
    return any(peft_trains(".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _check_encoder(mcfg: ModelConfig, prefix: str, untrained: list[str]) -> None:
    """Refuse a checkpoint that lacks encoder weights (a truncated conversion, a config that does
    not match its weights): they would be random, frozen and unsaved, so the run would train on
    noise and every later load would draw different noise. The pooler is left to the head check:
    only the default head reads it (loraclf's heads read the last hidden states)."""
    encoder = [k for k in untrained if k.startswith(f"{prefix}.") and ".pooler." not in f".{k}."]
    if encoder:
        raise ModelError(f"the checkpoint lacks {len(encoder)} encoder weight(s) ({first_few(encoder)}): they would "
                         "be random and never trained", where=str(mcfg.name_or_path),
                         fix="use a complete checkpoint whose config.json matches its weights (download it again)")


def _check_default_head(mcfg: ModelConfig, untrained: list[str]) -> None:
    """The model's own head must be all classifier: PEFT trains and saves only the modules named
    like one (:func:`peft_trains`). A head with more — DeBERTa's pooler, XLNet's sequence summary,
    BART's classification_head — not in the checkpoint would stay randomly initialised, frozen and
    unsaved: every load of the run would draw it anew and predict something else. ``untrained``:
    :func:`_untrained` of the checkpoint's missing weights."""
    if untrained:
        raise ModelError(f"model.head default would leave weights the checkpoint lacks random and untrained "
                         f"({first_few(untrained)}): "
                         "only the classifier is trained and saved", where=str(mcfg.name_or_path),
                         fix="train with model.head linear (or mean, lowrank), which replace the model's own head")
