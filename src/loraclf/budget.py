"""Exact trainable-parameter counts of a configuration, without loading a single weight.

The model is built on the ``meta`` device (shapes only), LoRA applied by PEFT exactly as in
training, and the parameters with ``requires_grad`` counted: the count is the one training
will see, not a formula that could drift from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from .config import Config
from .errors import BudgetError
from .model import build_model, load_model_config

_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass
class Breakdown:
    """Parameter counts. ``lora``: {"layer 0 query": n, ...}; ``head``: {"classifier.dense": n, ...}."""

    total: int
    trainable: int
    lora: dict[str, int] = field(default_factory=dict)
    head: dict[str, int] = field(default_factory=dict)

    @property
    def lora_total(self) -> int:
        return sum(self.lora.values())

    @property
    def head_total(self) -> int:
        return sum(self.head.values())

    def largest(self, k: int = 3) -> list[tuple[str, int]]:
        items = list(self.lora.items()) + [(f"head {n}", v) for n, v in self.head.items()]
        return sorted(items, key=lambda kv: -kv[1])[:k]

    def to_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "lora_total": self.lora_total,
                "head_total": self.head_total, "lora": self.lora, "head": self.head}


def _lora_site(name: str) -> tuple[str | None, str, str]:
    """'base_model.model.roberta.encoder.layer.10.attention.self.query.lora_A.default.weight'
    -> ('10', 'attention.self.query', 'encoder'): the layer index, the module's path inside the
    layer and the stack the layer list sits in (its parent's name; T5: 'encoder' or 'decoder')."""
    module = name.split(".lora_")[0]
    m = _LAYER_RE.search(module + ".")
    if not m:
        return None, module.rsplit(".", 1)[-1], ""
    stack = module[: m.start()].split(".")  # [..., 'decoder', 'block']
    return m.group(1), module[m.end():], stack[-2] if len(stack) > 1 else stack[-1]


def _lora_keys(names: list[str]) -> dict[str, str]:
    """Display keys: 'layer 10 query', or the path inside the layer where leaf names repeat
    ('layer 10 attention.output.dense' and 'layer 10 output.dense', not 'layer 10 dense' twice)."""
    sites = {n: _lora_site(n) for n in names}
    paths_by_leaf: dict[str, set[str]] = {}
    for _, path, _ in sites.values():
        paths_by_leaf.setdefault(path.rsplit(".", 1)[-1], set()).add(path)
    keys = {}
    for n, (layer, path, _) in sites.items():
        leaf = path.rsplit(".", 1)[-1]
        shown = leaf if len(paths_by_leaf[leaf]) == 1 else path
        keys[n] = f"layer {layer} {shown}" if layer is not None else shown
    # An encoder-decoder (T5, BART) numbers its encoder's and decoder's layers alike: their
    # modules would share a key and be added up. Then every key names its stack ('decoder layer 0 ...').
    modules_by_key: dict[str, set[str]] = {}
    for n, key in keys.items():
        modules_by_key.setdefault(key, set()).add(n.split(".lora_")[0])
    if any(len(modules) > 1 for modules in modules_by_key.values()):
        keys = {n: f"{sites[n][2]} {key}" if sites[n][0] is not None else key for n, key in keys.items()}
    return keys


def _head_key(name: str) -> str:
    """'base_model.model.classifier.modules_to_save.default.dense.weight' -> 'classifier.dense'."""
    parts = [p for p in name.split(".") if p not in ("base_model", "model", "modules_to_save", "default")]
    return ".".join(parts[:-1]) or parts[-1]


def breakdown(model: torch.nn.Module) -> Breakdown:
    """Count a built (PEFT) model. Frozen copies PEFT keeps of trained modules are not counted in
    ``total``: it is the size of the model as it runs."""
    total = trainable = 0
    lora: dict[str, int] = {}
    head: dict[str, int] = {}
    lora_keys = _lora_keys([n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n])
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        n = p.numel()
        total += n
        if not p.requires_grad:
            continue
        trainable += n
        if ".lora_" in name:
            key = lora_keys[name]
            lora[key] = lora.get(key, 0) + n
        else:
            key = _head_key(name)
            head[key] = head.get(key, 0) + n
    return Breakdown(total, trainable, lora, head)


def count(cfg: Config, label_names: list[str], config: PretrainedConfig | None = None) -> Breakdown:
    """Exact counts for ``cfg`` with ``len(label_names)`` classes, on the meta device.
    ``config``: the architecture config, when the caller has loaded it already."""
    config = config or load_model_config(cfg.model, label_names)
    model = build_model(cfg.model, cfg.lora, config, meta=True)
    return breakdown(model)


def check(b: Breakdown, budget: int) -> None:
    if b.trainable > budget:
        top = ", ".join(f"{k} {v:,}" for k, v in b.largest())
        raise BudgetError(
            f"{b.trainable:,} trainable parameters exceed the budget of {budget:,} (largest: {top})",
            where="train.max_trainable_params",
            fix="lower lora.r, adapt fewer lora.layers or lora.target_modules, use a cheaper --model.head (linear: "
                "H x classes + classes), or raise train.max_trainable_params; loraclf plan lists what fits",
        )
