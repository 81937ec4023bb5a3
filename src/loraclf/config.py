"""Typed configuration: one section per concern, loaded from YAML, overridden by
``--section.key value`` pairs, validated once with every problem reported together.

Pydantic does the validation because it reports *all* errors of a document at once with
their location, which is what a user fixing a YAML file wants.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, brief


class _Section(BaseModel):
    # Unknown keys are errors, never silently ignored: a typo must not train the wrong recipe.
    # inf/nan are never a sensible setting here (an infinite learning rate or validation_size
    # crashed deep inside a run instead of being refused with the key's name).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: Any) -> Any:
        # pydantic reads true as 1 for a number: `r: on` or `epochs: yes` trained with 1
        if _bool_where_number(cls.model_fields[info.field_name].annotation, value):
            raise ValueError(f"a number is expected, not true/false (got {json.dumps(value)})")
        return value


def _bool_where_number(annotation: Any, value: Any) -> bool:
    """Does ``value`` hold a bool (itself, in a list, or as a dict value) where ``annotation`` wants a number?"""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if bool in args:  # a switch (bool | None) keeps its booleans
            return False
        if isinstance(value, (list, dict)):
            return any(_bool_where_number(a, value) for a in args if a is not type(None))
        return isinstance(value, bool) and any(a in (int, float) for a in args)
    if origin is list and isinstance(value, list):
        return any(_bool_where_number(args[0], v) for v in value)
    if origin is dict and isinstance(value, dict):
        return any(_bool_where_number(args[1], v) for v in value.values())
    return isinstance(value, bool) and annotation in (int, float)


class ModelConfig(_Section):
    """The pretrained encoder and the classification head."""

    name_or_path: str = Field("roberta-base", description="hub id or local directory of the encoder")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); a run records the commit it trained on")
    head: Literal["default", "linear", "mean", "lowrank"] = Field(
        "default", description="classification head: default = the model's own; linear = one linear layer on the "
        "first token (the last real one on causal models: GPT-2, Llama...); mean = one linear layer on the mean of non-pad tokens; lowrank = the model's own head shape "
        "with its dense layer factorised at rank head_rank"
    )
    head_rank: int | None = Field(None, gt=0, description="rank of the factorised dense layer (head: lowrank only; "
                                  "null = 16)")
    trust_remote_code: bool = Field(False, description="allow code shipped with the model to run")

    @model_validator(mode="after")
    def _head_rank_only_lowrank(self) -> ModelConfig:
        if self.head_rank is not None and self.head != "lowrank":
            raise ValueError(f"head_rank applies only to head 'lowrank' (head is '{self.head}'); "
                             "set --model.head_rank null")
        return self


class LoraSettings(_Section):
    """LoRA adapters, applied through PEFT."""

    r: int = Field(8, gt=0, le=2**20, description="rank of each LoRA update")
    alpha: float = Field(16, gt=0, description="scaling numerator: update scaled by alpha/r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(["query", "value"], min_length=1, description="module names to adapt")
    layers: list[int] | None = Field(None, description="encoder layer indices to adapt; null = all")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    rank_pattern: dict[str, int] | None = Field(
        None, description="per-module ranks: {regex: rank}, regex matched against the end of module names "
        "(PEFT rank_pattern), e.g. {'intermediate.dense': 4}")
    alpha_pattern: dict[str, float] | None = Field(None, description="per-module alphas, like rank_pattern")
    exclude_modules: list[str] | None = Field(
        None, description="module names (suffixes) never adapted even when target_modules matches them")

    # Field validators, not model validators: the error then names the key (lora.layers), so a
    # value from the command line is blamed on the command line, not on the config file.
    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_valid(cls, pattern: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (pattern or {}).items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"key {key!r} is not a valid regular expression ({e})") from None
            if value <= 0:
                raise ValueError(f"[{key!r}] must be > 0, got {value}")
        return pattern

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None:
            if not layers:
                raise ValueError("empty list; use null for all layers")
            if any(i < 0 for i in layers):
                raise ValueError(f"layer indices must be >= 0, got {layers}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layer indices repeat: {layers}")
        return layers


class DataConfig(_Section):
    """Where the examples come from and how rows become (text, label)."""

    train: str = Field("fancyzhx/ag_news", description="local file or hub dataset ('name' or 'name:split')")
    validation: str | None = Field(None, description="local file or hub split; null = carve from train")
    test: str | None = Field(None, description="local file or hub split; never used for model selection")
    format: Literal["auto", "agnews", "csv", "tsv", "jsonl", "parquet"] = Field(
        "auto", description="file format of local files; auto = by extension and content"
    )
    text_columns: list[str] = Field(["text"], min_length=1, description="text column(s), joined with a space")
    label_column: str = Field("label", description="label column (ints or strings)")
    label_names: list[str] | None = Field(None, description="names of integer labels 0..N-1")
    validation_size: float = Field(0.05, gt=0, description="fraction (<1) or row count carved from train")
    split_seed: int = Field(42, ge=0, lt=2**32, description="seed of the shuffle that carves validation and sample "
                            "limits")
    max_train_samples: int | None = Field(None, gt=0, description="use at most this many training rows")
    max_eval_samples: int | None = Field(None, gt=0, description="use at most this many validation/test rows")
    max_length: int = Field(512, gt=1, description="truncate texts to this many tokens")
    max_text_chars: int = Field(100_000, gt=0, description="reject texts longer than this (characters)")
    pad_to_multiple_of: int | None = Field(
        None, gt=0, description="round each training batch's padded length up to a multiple of this "
        "(fewer distinct shapes for torch.compile / CUDA graphs, tensor-core friendly); null = pad to the longest row")
    token_cache: bool = Field(True, description="keep token ids on disk ($LORACLF_CACHE, else ~/.cache/loraclf), "
                              "keyed by tokenizer, max_length and texts: reruns skip tokenization")

    @field_validator("validation_size")
    @classmethod
    def _whole_rows(cls, size: float) -> float:
        if size >= 1 and not float(size).is_integer():
            raise ValueError(f"validation_size {size} is neither a fraction (below 1) nor a whole number of rows")
        return size

    @field_validator("label_names", mode="before")
    @classmethod
    def _numbers_as_names(cls, names: Any) -> Any:
        # star ratings written as YAML numbers ([1, 2, 3, 4, 5]): five "valid string" errors before
        if isinstance(names, list):
            return [str(n) if isinstance(n, int) and not isinstance(n, bool) else n for n in names]
        return names

    @field_validator("label_names")
    @classmethod
    def _names_unique(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"names repeat: {names}")
        if names is not None and len(names) < 2:
            raise ValueError(f"{len(names)} class name(s) {names}: a classifier needs at least two "
                             "(null: names from the data)")
        return names


# torch.compile modes that record CUDA graphs themselves (they cannot nest inside loraclf's)
COMPILE_MODES_WITH_GRAPHS = ("reduce-overhead", "max-autotune")


class TrainConfig(_Section):
    """The optimisation recipe and where its run directory goes."""

    output_dir: str = Field("runs/loraclf", description="run directory")
    overwrite: bool = Field(False, description="replace an existing run directory")
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(16, gt=0, description="examples per micro-batch")
    gradient_accumulation_steps: int = Field(1, gt=0)
    eval_batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="after warm-up")
    warmup_ratio: float = Field(0.06, ge=0, le=1, description="linear warm-up, fraction of optimizer steps")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")
    seed: int = Field(42, ge=0, lt=2**32, description="seed of initialisation, dropout and batch order "
                      "(numpy's range: 0 to 2**32 - 1)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast where the hardware runs it fast (CUDA bf16, CPU AMX or AVX512-BF16), else fp32"
    )
    max_trainable_params: int = Field(1_000_000, gt=0, description="hard budget: LoRA + head")
    group_by_length: bool = Field(True, description="batch rows of similar length together")
    fuse_accumulation: bool | None = Field(
        None, description="run the gradient_accumulation_steps micro-batches of an optimizer step as one batch "
        "of batch_size x steps rows: the same mean loss over the same rows, in fewer and larger kernels "
        "(dropout draws and batch padding differ); null = on when training on a GPU (about 1.8x there, "
        "indicative: two separate H200 calls, BENCHMARKS.md), off on CPUs")
    compile: bool = Field(False, description="torch.compile each layer in place (inductor, dynamic shapes); "
                          "the first steps pay the compilation")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when train.compile is on; reduce-overhead replays CUDA graphs "
        "(GPU only: one graph per batch shape, so pair it with data.pad_to_multiple_of)")
    cuda_graphs: bool | None = Field(
        None, description="capture each batch shape's forward + backward in a CUDA graph and replay it (GPU steps are "
        "launch-bound: 6.2x on an H200, BENCHMARKS.md); batch lengths are rounded up to data.pad_to_multiple_of (16 "
        "when unset) so few shapes occur; compiled layers (train.compile, modes without their own graphs) run inside "
        "them. null = on when training on one CUDA GPU with one optimizer step per batch, unless compile_mode "
        "records its own graphs, and a model whose step cannot be captured falls back to eager; true = insist "
        "(an error where it cannot work); false = off")
    max_tokens_per_batch: int | None = Field(
        None, gt=0, description="token budget per micro-batch (rows x longest row, padded; at least the "
        "longest training row): batches hold as many rows as fit, so short rows come in bigger batches; "
        "batch_size is then only the mega-batch unit; null = batch_size rows")
    log_every_steps: int = Field(20, gt=0, description="optimizer steps between train-loss records")
    checkpoint_every_steps: int | None = Field(500, gt=0, description="optimizer steps between checkpoints "
                                                "(also written at every epoch end); null = epoch ends only")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept in RUN_DIR/checkpoints")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training loss")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+: learning rate of LoRA B matrices (and 1-D tensors) = learning_rate x this "
        "(PEFT create_loraplus_optimizer); null = off")
    cache_frozen_prefix: bool | None = Field(
        None, description="when LoRA adapts only layers k and above, compute the embeddings and layers below k "
        "once (eval mode: no dropout there) and train from layer k; null = on where it applies")
    prefix_cache_ram_mb: int = Field(4096, ge=0, description="frozen-prefix cache kept in RAM up to this size, "
                                     "memory-mapped in the run directory beyond it")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop after this many epochs without a better validation accuracy; null = off")

    @field_validator("output_dir")
    @classmethod
    def _home(cls, value: str) -> str:
        # "~/runs/x" from YAML or "--train.output_dir=~/x" (the shell leaves it) made a folder
        # named "~" here, while the data paths beside it were read from the home folder
        return os.path.expanduser(value)

    @model_validator(mode="after")
    def _graphs_compatible(self) -> TrainConfig:
        if self.cuda_graphs is True and self.compile and self.compile_mode in COMPILE_MODES_WITH_GRAPHS:
            raise ValueError(f"cuda_graphs with compile_mode {self.compile_mode}, which records torch.compile's own "
                             "CUDA graphs; use compile_mode default or max-autotune-no-cudagraphs (compiled layers "
                             "inside loraclf's graphs), or turn one off")
        if self.cuda_graphs is True and self.fuse_accumulation is False and self.gradient_accumulation_steps > 1:
            raise ValueError("cuda_graphs needs one optimizer step per batch: set fuse_accumulation to null or true, "
                             "or gradient_accumulation_steps to 1")
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


SECTIONS: dict[str, type[_Section]] = {
    name: typing.get_type_hints(Config)[name] for name in Config.model_fields
}


def _is_str_field(section: str, key: str) -> bool:
    """True when the field takes a plain string, so ``--model.name_or_path 123`` stays '123'."""
    field = SECTIONS[section].model_fields.get(key)
    if field is None:
        return False
    ann = field.annotation
    args = typing.get_args(ann) if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union else (ann,)
    return str in args


def parse_override_value(dotted_key: str, raw: str) -> Any:
    """Turn the text after ``--section.key`` into a value: YAML syntax (``8``, ``[0,1,5]``,
    ``null``, ``true``), except that string fields keep the text as typed."""
    section, _, key = dotted_key.partition(".")
    if section in SECTIONS and _is_str_field(section, key) and raw not in ("null", "~"):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML keeps the last,
    so a second `lora:` section silently replaced the first (a typo training the wrong recipe)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": merged keys may be overridden, that is what merging is for
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # a list as a key: SafeLoader's own "found unhashable key" error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(["is a directory, not a config file"], where=str(p), fix="give --config a YAML file")
    if not p.exists():  # a pipe (--config <(...)) or /dev/null is no regular file, and readable
        raise ConfigError(["config file not found"], where=str(p), fix="check the path given to --config")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start:,})"], where=str(p), fix="save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError([f"cannot read ({e.strerror or e})"], where=str(p), fix="make the file readable") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{p}:{mark.line + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or brief(e)
        raise ConfigError([f"not valid YAML ({problem})"], where=loc,
                          fix="keep one of the two" if "appears twice" in problem else "correct the YAML syntax") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(["top level must be a mapping of sections (model, lora, data, train)"], where=str(p))
    return doc


def _format_errors(err: ValidationError, prefix: str = "", from_cli: frozenset[str] = frozenset(),
                   in_file: frozenset[tuple[str, str]] = frozenset()) -> list[tuple[str, bool]]:
    """(problem, whether its key came from the command line) for each error; ``prefix``: the
    section of a model validated on its own (evaluate's ``data``); ``in_file``: (section, message)
    of the checks across keys that the file fails without any override."""
    problems = []
    for e in err.errors():
        parts = [prefix, *(str(x) for x in e["loc"])] if prefix else [str(x) for x in e["loc"]]
        loc = ".".join(parts)
        # an error of a whole section (a check across its keys) is the command line's when an
        # override touched that section and made the combination (not when the file alone has it)
        # an element of a list (data.label_names.0) is the command line's when the list was
        cli = (loc in from_cli or any(loc.startswith(k + ".") for k in from_cli)
               or (len(parts) == 1 and (loc, e["msg"]) not in in_file
                   and any(k.startswith(loc + ".") for k in from_cli)))
        name = f"--{loc}" if cli else loc
        if e["type"] == "extra_forbidden":
            section = parts[0]
            known = SECTIONS.get(section).model_fields if len(parts) > 1 and section in SECTIONS else SECTIONS
            problems.append((f"unknown key '{name}' (known: {', '.join(known)})", cli))
        elif e["type"] == "value_error":
            problems.append((f"{name}: {e['msg'].removeprefix('Value error, ')}".lstrip(": "), cli))
        else:
            problems.append((f"{name}: {e['msg']} (got {e['input']!r})", cli))
    return problems


def _raise_problems(problems: list[tuple[str, bool]], where: str | None) -> None:
    """One ConfigError for all problems, placed where they came from: the file, the command line or both."""
    if not problems:
        return
    cli = [c for _, c in problems]
    if all(cli):
        where = "command line"
    elif any(cli):
        where = f"{where or 'config'} and command line"
    raise ConfigError([p for p, _ in problems], where=where or "config", fix="correct the keys named")


def build_config(doc: dict[str, Any], overrides: dict[str, Any] | None = None, where: str | None = None) -> Config:
    """Validate a config document plus dotted-key overrides; raise one ConfigError listing all problems."""
    # a section whose keys are all commented out (``lora:``) loads as None: an empty section
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else {} if v is None and k in SECTIONS else v)
                              for k, v in doc.items()}
    problems: list[tuple[str, bool]] = []
    applied = []
    for dotted, value in (overrides or {}).items():
        section, dot, key = dotted.partition(".")
        if not dot or not key or "." in key:
            problems.append((f"override '--{dotted}' must look like --section.key (e.g. --lora.r 8)", True))
            continue
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # the file's section is not a mapping (``lora: 5``): validation blames the file
        target[key] = value
        applied.append(dotted)
    cfg = None
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as e:
        in_file: frozenset[tuple[str, str]] = frozenset()
        if applied and any(len(x["loc"]) == 1 for x in e.errors()):
            try:
                Config.model_validate(doc)
            except ValidationError as alone:
                in_file = frozenset((".".join(map(str, x["loc"])), x["msg"]) for x in alone.errors() if len(x["loc"]) == 1)
            except Exception:  # noqa: BLE001 - the file alone may not even be a document: no such errors
                pass
        problems.extend(_format_errors(e, from_cli=frozenset(applied), in_file=in_file))
    _raise_problems(problems, where)
    return cfg


def data_config(base: dict[str, Any], overrides: dict[str, Any]) -> DataConfig:
    """A run's data section (``base``) with ``overrides`` ({'test': ..., 'max_eval_samples': ...},
    from evaluate's --data.KEY options) applied and validated; errors name the options."""
    try:
        return DataConfig.model_validate({**base, **overrides})
    except ValidationError as e:
        _raise_problems(_format_errors(e, prefix="data", from_cli=frozenset(f"data.{k}" for k in overrides)), None)
        raise  # unreachable: _raise_problems raised


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load ``path`` (YAML; None = all defaults) and apply ``overrides`` ({'lora.r': 8, ...})."""
    doc = _read_yaml(path) if path is not None else {}
    return build_config(doc, overrides, where=str(path) if path else None)


def save_config(cfg: Config, path: str | Path) -> None:
    from .runs import write_errors_as_oserror  # (runs imports this module)

    with write_errors_as_oserror(Path(path)):  # a full disk's write() names no file: this one
        Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def config_keys() -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every key: the CLI's help lists them."""
    rows = []
    for section, cls in SECTIONS.items():
        for key, field in cls.model_fields.items():
            rows.append((f"{section}.{key}", field.description or "", field.get_default(call_default_factory=True)))
    return rows
