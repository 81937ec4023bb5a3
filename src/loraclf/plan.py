"""The budget planner: which head, modules, layers and ranks fit a trainable-parameter budget.

How it counts. The model is built once on the ``meta`` device (shapes, no weights) and read:
the repeated encoder blocks (the ``nn.ModuleList`` with one entry per layer), the linear layers
inside a block with their shapes, and each head's size. A LoRA adapter of rank r on a linear
layer in -> out trains r*(in + out) parameters (+ out for DoRA's magnitude vector), so every
candidate is counted analytically in microseconds. The count is exact, not an estimate:
``tests/test_plan.py`` checks it against the model PEFT builds (``budget.count``) for several
architectures, and ``--write`` re-counts the written config that way before writing it.

Module roles come from the module tree, not from a table of architectures: inside a block,
layers whose leaf name says query/key/value (``query``, ``q``, ``q_proj``, ``q_lin``,
``query_proj``...) or a fused projection (``c_attn``, ``qkv``...) are q/k/v; any other layer
under an ``attention``/``attn`` path is the attention output; the rest is the feed-forward
network, whose layers widen (in) or narrow (out) the hidden state. PEFT matches
``target_modules`` by name suffix, so each role gets the shortest suffix that matches only it
(RoBERTa: ``query``, ``attention.output.dense``, ``intermediate.dense``); where none exists
(RoBERTa's FFN ``output.dense`` is also a suffix of ``attention.output.dense``) the planner
adds ``exclude_modules`` for the roles it did not choose, and keys ``rank_pattern`` by the
layer index in front of the path (``\\d+\\.output\\.dense``).

How it ranks (best first):
1. breadth: more adapted (layer, module) sites. The LoRA paper (Hu et al. 2021, sec. 7.1)
   found adapting more weight types at a lower rank beats fewer at a higher rank for the
   same budget, and QLoRA (Dettmers et al. 2023) that adapting every linear layer of every
   block is what matches full fine-tuning; a small rank suffices (LoRA Table 6).
2. budget use, in whole percent: parameters the budget allows but a plan leaves unused are
   capacity given away. This is why cheap heads rank first: roberta-base's own head costs
   593,668 of 1,000,000, a linear head 3,076, and the difference buys LoRA rank.
3. then simpler before more complex: one rank for every module before per-module ranks
   (rank_pattern), balanced ranks before lopsided ones, then the head order given
   (linear, mean, lowrank, default by default) and the layer order (all, top half,
   top quarter, every other).
The ranking is a heuristic for what to try first, not a measurement of accuracy: that is the
accuracy study's job (issue 4, bench/ and BENCHMARKS.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from transformers import PretrainedConfig

from .config import Config, build_config
from .errors import BudgetError, ModelError, first_few
from .heads import CLASSIFIER_ATTRS, DEFAULT_HEAD_RANK, HEADS, classifier_attr, trained_head_params
from .model import (build_model, default_head_gaps, find_blocks, has_local_weights, is_linear, load_model_config,
                    num_layers, skeleton)
from .runs import write_text

DEFAULT_HEADS = ("linear", "mean", f"lowrank:{DEFAULT_HEAD_RANK}", "default")

_Q = {"query", "q", "q_proj", "q_lin", "query_proj", "wq", "q_linear"}
_K = {"key", "k", "k_proj", "k_lin", "key_proj", "wk", "k_linear"}
_V = {"value", "v", "v_proj", "v_lin", "value_proj", "wv", "v_linear"}
_QKV = {"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj", "qkv_linear"}
ROLE_NAMES = {"q": "query", "k": "key", "v": "value", "qkv": "qkv", "o": "attn-out", "ffn_in": "ffn-in",
              "ffn_out": "ffn-out", "other": "other"}
# Named selections of roles, in display order: (name, roles required, roles selected or a group).
_ROLE_SETS: tuple[tuple[str, frozenset[str], str | frozenset[str]], ...] = (
    ("qv", frozenset({"q", "v"}), frozenset({"q", "v"})),
    ("qkv", frozenset({"q", "k", "v"}), frozenset({"q", "k", "v"})),
    ("qkv", frozenset({"qkv"}), frozenset({"qkv"})),
    ("attn", frozenset(), "attention"),
    ("ffn", frozenset(), "ffn"),
    ("qv+ffn", frozenset({"q", "v"}), frozenset({"q", "v", "ffn_in", "ffn_out", "other"})),
    ("all", frozenset(), "all"),
)


@dataclass(frozen=True)
class Site:
    """One linear layer inside every encoder block."""

    path: str  # inside a block, e.g. 'attention.self.query'
    role: str  # q, k, v, qkv, o, ffn_in, ffn_out, other
    group: str  # attention | ffn
    in_features: int
    out_features: int
    target: str  # the target_modules entry for it
    exact: bool  # True: target matches this layer in every block and nothing else
    collisions: tuple[str, ...] = ()  # other module names the target matches

    @property
    def rank_key(self) -> str:
        """A rank_pattern/alpha_pattern key matching exactly this layer in every block."""
        return self.target if self.exact else r"\d+\." + re.escape(self.path)


@dataclass
class Architecture:
    model_type: str
    num_layers: int
    container: str  # the ModuleList of blocks, e.g. 'roberta.encoder.layer'
    sites: list[Site]
    num_labels: int
    heads: dict[str, int] = field(default_factory=dict)  # 'linear' / 'lowrank:16' -> parameters
    left_out: dict[str, str] = field(default_factory=dict)  # site path -> why it is not planned


@dataclass
class Plan:
    head: str
    head_rank: int | None
    head_params: int
    role_set: str
    sites: tuple[Site, ...]
    layers: tuple[int, ...]
    layer_set: str
    rank: int  # of the attention sites (and of all, when ffn_rank is None)
    ffn_rank: int | None  # a different rank for the feed-forward sites (rank_pattern)
    lora_params: int
    budget: int
    arch: Architecture = field(repr=False)
    order: tuple = ()

    @property
    def trainable(self) -> int:
        return self.head_params + self.lora_params

    @property
    def fill(self) -> float:
        return self.trainable / self.budget

    @property
    def adapted(self) -> int:
        return len(self.sites) * len(self.layers)

    @property
    def head_label(self) -> str:
        return f"lowrank:{self.head_rank}" if self.head == "lowrank" else self.head

    @property
    def rank_label(self) -> str:
        return str(self.rank) if self.ffn_rank is None else f"attn {self.rank} / ffn {self.ffn_rank}"

    def rank_of(self, site: Site) -> int:
        return self.ffn_rank if self.ffn_rank is not None and site.group == "ffn" else self.rank

    def describe(self) -> str:
        mods = ", ".join(s.path for s in self.sites)
        return (f"head {self.head_label} ({self.head_params:,}) + LoRA r={self.rank_label} on {mods} of "
                f"{self.layer_set} ({self.lora_params:,}) = {self.trainable:,} trainable "
                f"({100 * self.fill:.1f}% of {self.budget:,})")

    def lora_settings(self, alpha_per_rank: float | None, alpha: float) -> dict[str, Any]:
        """The ``lora`` section keys this plan sets. ``alpha_per_rank``: keep alpha/r at this
        ratio for every module (None: keep ``alpha`` as is, e.g. with rsLoRA)."""
        targets, collided = [], []
        chosen = {s.path for s in self.sites}
        for s in self.sites:
            if s.target not in targets:
                targets.append(s.target)
            collided.extend(s.collisions)  # other modules this target also matches
        # A collision that is another site of a block: fine when chosen, else excluded by its own
        # exact target when it has one (shorter than listing every block).
        by_full = {f"{self.arch.container}.{i}.{s.path}": s for s in self.arch.sites for i in range(self.arch.num_layers)}
        exclude: list[str] = []
        for name in collided:
            other = by_full.get(name)
            if other is not None and other.path in chosen:
                continue
            entry = other.target if other is not None and other.exact else name
            if entry not in exclude:
                exclude.append(entry)
        out: dict[str, Any] = {
            "r": self.rank,
            "target_modules": targets,
            "exclude_modules": exclude or None,
            "layers": None if len(self.layers) == self.arch.num_layers else list(self.layers),
            "rank_pattern": None,
            "alpha_pattern": None,
            "alpha": _nice(alpha_per_rank * self.rank) if alpha_per_rank is not None else alpha,
        }
        if self.ffn_rank is not None:
            ffn = [s for s in self.sites if s.group == "ffn"]
            out["rank_pattern"] = {s.rank_key: self.ffn_rank for s in ffn}
            if alpha_per_rank is not None:
                out["alpha_pattern"] = {s.rank_key: _nice(alpha_per_rank * self.ffn_rank) for s in ffn}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "percent_of_budget": round(100 * self.fill, 2),
                "head": self.head, "head_rank": self.head_rank, "head_params": self.head_params,
                "lora_params": self.lora_params, "modules": self.role_set, "paths": [s.path for s in self.sites],
                "layers": list(self.layers), "layer_set": self.layer_set, "rank": self.rank,
                "ffn_rank": self.ffn_rank, "adapted_sites": self.adapted}


def _nice(x: float) -> float:
    return float(round(x, 4))


def _shape(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # transformers Conv1D: weight is (in, out)
    return int(w.shape[0]), int(w.shape[1])


def _role(path: str, in_f: int, out_f: int) -> tuple[str, str]:
    parts = path.lower().split(".")
    leaf = parts[-1]
    for role, names in (("q", _Q), ("k", _K), ("v", _V), ("qkv", _QKV)):
        if leaf in names:
            return role, "attention"
    if any("attn" in p or "attention" in p for p in parts[:-1]) or leaf in {"o_proj", "out_proj", "out_lin", "o"}:
        return "o", "attention"
    if out_f > in_f:
        return "ffn_in", "ffn"
    if in_f > out_f:
        return "ffn_out", "ffn"
    return "other", "ffn"


def analyze(cfg: Config, label_names: list[str], heads: tuple[str, ...] = DEFAULT_HEADS) -> Architecture:
    """Read the architecture of ``cfg.model`` on the meta device: blocks, linear layers, head sizes."""
    config = load_model_config(cfg.model, label_names)

    def build(head: str = "default", rank: int | None = None) -> torch.nn.Module:
        return skeleton(cfg.model, config, head, rank)

    arch = analyze_model(build(), config)
    for spec in heads:
        # Each head counted on a model built with it, by PEFT's own rule for what it trains.
        arch.heads[spec] = trained_head_params(build(*parse_head(spec)))
    _keep_sites_peft_adapts_as_counted(cfg, config, arch)
    return arch


def _keep_sites_peft_adapts_as_counted(cfg: Config, config: PretrainedConfig, arch: Architecture) -> None:
    """Leave out the sites PEFT does not adapt as the Linear layers they are: PEFT 0.18+ turns a
    gate_proj/up_proj/down_proj target of a mixture-of-experts model (DeepSeek, Qwen-MoE, OLMoE...)
    into LoRA on the fused expert weights, a count the planner's (in + out) x r does not give.
    Each site is built once by PEFT on the meta device at r=1 (40 ms each on roberta-base, ~250 ms
    on a 70B-shaped Llama)."""
    from .budget import breakdown
    from .errors import LoraclfError

    mcfg = cfg.model.model_copy(update={"head": "default", "head_rank": None})  # the LoRA count does not depend on it
    kept = []
    for site in arch.sites:
        lcfg = cfg.lora.model_copy(update={"r": 1, "alpha": 1, "target_modules": [site.target],
                                           "exclude_modules": list(site.collisions) or None, "layers": None,
                                           "rank_pattern": None, "alpha_pattern": None, "use_dora": False})
        try:
            got = breakdown(build_model(mcfg, lcfg, config, meta=True)).lora_total
        except LoraclfError as e:
            arch.left_out[site.path] = f"PEFT cannot adapt it ({e.what})"
            continue
        want = arch.num_layers * (site.in_features + site.out_features)
        if got != want:
            arch.left_out[site.path] = (f"PEFT adapts it otherwise than as a {site.in_features}x{site.out_features} "
                                        f"linear layer ({got:,} parameters at r=1 over {arch.num_layers} layers, "
                                        f"not {want:,}: fused experts?)")
            continue
        kept.append(site)
    arch.sites = kept


def distinct_heads(specs: Iterable[str]) -> tuple[str, ...]:
    """Each head once, in the order given, by what :func:`parse_head` reads (``lowrank``,
    ``lowrank:16`` and ``lowrank:016`` are one head); a spec it refuses is kept, to be refused
    where heads are used."""
    seen: dict[Any, str] = {}
    for spec in specs:
        try:
            key: Any = parse_head(spec)
        except ModelError:
            key = spec
        seen.setdefault(key, spec)
    return tuple(seen.values())


def parse_head(spec: str) -> tuple[str, int | None]:
    kind, _, rank = spec.partition(":")
    if kind not in HEADS:
        raise ModelError(f"unknown head '{spec}'", where="--heads", fix=f"use {', '.join(HEADS)} (lowrank:K for rank K)")
    if kind != "lowrank":
        if rank:
            raise ModelError(f"head '{kind}' takes no rank (got '{spec}')", where="--heads")
        return kind, None
    if not rank:
        return kind, DEFAULT_HEAD_RANK
    if not rank.isdigit() or int(rank) < 1:
        raise ModelError(f"lowrank head rank must be a positive integer (got '{spec}')", where="--heads")
    return kind, int(rank)


def analyze_model(model: torch.nn.Module, config: PretrainedConfig) -> Architecture:
    """Blocks and their linear layers (``heads`` left empty: ``analyze`` fills them)."""
    n = num_layers(config)
    container = find_blocks(model, n)
    try:
        cls_attr = classifier_attr(model)
    except ModelError:
        cls_attr = None
    names = [nm for nm, m in model.named_modules() if is_linear(m)
             and not (cls_attr and (nm == cls_attr or nm.startswith(cls_attr + ".")))]
    blocks = dict(model.named_modules())[container]
    per_block = [[(p, _shape(m)) for p, m in blocks[i].named_modules() if is_linear(m)] for i in range(n)]
    if any(b != per_block[0] for b in per_block):
        raise ModelError(f"the {n} blocks of '{config.model_type}' differ in their linear layers; the planner "
                         "assumes identical blocks", where="model.name_or_path", fix="set lora.* by hand")
    sites = []
    for path, (in_f, out_f) in per_block[0]:
        want = {f"{container}.{i}.{path}" for i in range(n)}
        parts = path.split(".")
        target, exact, collisions = path, False, ()
        for j in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[j:])
            hits = {nm for nm in names if nm == suffix or nm.endswith("." + suffix)}
            if hits == want:
                target, exact = suffix, True
                break
        if not exact:
            collisions = tuple(sorted(nm for nm in names if (nm == path or nm.endswith("." + path)) and nm not in want))
        role, group = _role(path, in_f, out_f)
        sites.append(Site(path, role, group, in_f, out_f, target, exact, collisions))
    return Architecture(config.model_type, n, container, sites, config.num_labels)


def _layer_sets(n: int) -> list[tuple[str, tuple[int, ...]]]:
    sets = [(f"all {n} layers", tuple(range(n)))]
    for k in (n // 2, n // 4):
        if 1 <= k < n:
            sets.append((f"top {k} layers", tuple(range(n - k, n))))
    if n >= 2:
        odd = tuple(range(n - 1, -1, -2))[::-1]
        sets.append((f"every 2nd layer ({len(odd)})", odd))
    out, seen = [], set()
    for label, layers in sets:
        if layers not in seen:
            seen.add(layers)
            out.append((label, layers))
    return out


def _role_sets(sites: list[Site]) -> list[tuple[str, tuple[Site, ...]]]:
    roles = {s.role for s in sites}
    out, seen = [], set()
    for name, needs, pick in _ROLE_SETS:
        if not needs <= roles:
            continue
        if pick == "all":
            chosen = tuple(sites)
        elif isinstance(pick, str):
            chosen = tuple(s for s in sites if s.group == pick)
        else:
            chosen = tuple(s for s in sites if s.role in pick)
        key = tuple(s.path for s in chosen)
        if chosen and key not in seen:
            seen.add(key)
            out.append((name, chosen))
    return out


def _pow2_upto(hi: int, lo: int) -> list[int]:
    out, r = [], 1
    while r <= hi:
        if r >= lo:
            out.append(r)
        r *= 2
    return out


def enumerate_plans(arch: Architecture, budget: int, heads: tuple[str, ...] = DEFAULT_HEADS, min_rank: int = 4,
                    max_rank: int = 64, use_dora: bool = False, max_ratio: int = 4) -> list[Plan]:
    """Every candidate within ``budget``, best first (see the module docstring for the order)."""
    if budget < 1:
        raise BudgetError(f"budget must be positive (got {budget})", where="--budget")
    if min_rank < 1 or max_rank < min_rank:
        raise BudgetError(f"need 1 <= --min-rank <= --max-rank (got {min_rank}, {max_rank})", where="plan")
    plans: list[Plan] = []
    layer_sets = _layer_sets(arch.num_layers)
    for h_i, spec in enumerate(heads):
        kind, head_rank = parse_head(spec)
        hp = arch.heads[spec] if spec in arch.heads else None
        if hp is None:
            raise BudgetError(f"head '{spec}' was not analysed", where="plan")
        for set_name, sites in _role_sets(arch.sites):
            cap = min(max_rank, *(min(s.in_features, s.out_features) for s in sites))
            for l_i, (layer_label, layers) in enumerate(layer_sets):
                L = len(layers)
                cost = {g: L * sum(s.in_features + s.out_features for s in sites if s.group == g)
                        for g in ("attention", "ffn")}
                fixed = L * sum(s.out_features for s in sites) if use_dora else 0
                avail = budget - hp - fixed
                per_rank = cost["attention"] + cost["ffn"]
                if avail < per_rank * min_rank:
                    continue
                combos: set[tuple[int, int | None]] = set()
                r_max = min(cap, avail // per_rank)
                combos.add((r_max, None))
                p2 = _pow2_upto(r_max, min_rank)
                if p2:
                    combos.add((p2[-1], None))
                if cost["attention"] and cost["ffn"]:
                    for r_a in _pow2_upto(cap, min_rank):
                        r_f = min(cap, (avail - r_a * cost["attention"]) // cost["ffn"])
                        combos.add((r_a, r_f))
                    for r_f in _pow2_upto(cap, min_rank):
                        r_a = min(cap, (avail - r_f * cost["ffn"]) // cost["attention"])
                        combos.add((r_a, r_f))
                for r_a, r_f in combos:
                    if r_f is not None and (r_f == r_a or min(r_a, r_f) < min_rank
                                            or max(r_a, r_f) > max_ratio * min(r_a, r_f)):
                        continue
                    lora = r_a * cost["attention"] + (r_f if r_f is not None else r_a) * cost["ffn"] + fixed
                    if hp + lora > budget or r_a < min_rank:
                        continue
                    plan = Plan(kind, head_rank, hp, set_name, sites, layers, layer_label, r_a, r_f, lora, budget, arch)
                    ratio = 1.0 if r_f is None else max(r_a, r_f) / min(r_a, r_f)
                    plan.order = (-plan.adapted, -math.floor(100 * plan.fill + 1e-9), r_f is not None, ratio,
                                  h_i, l_i, -plan.trainable, set_name)
                    plans.append(plan)
    plans.sort(key=lambda p: p.order)
    return plans


def plan_config(base: Config, plan: Plan, budget: int, output_dir: str | None = None) -> Config:
    """``base`` with the plan's head and LoRA settings and ``budget`` as its limit; the data
    section and the training recipe are kept. ``output_dir`` (when given) replaces the run
    directory and ``overwrite`` is reset: a written plan is a new recipe, and training it must
    not collide with, or replace, the run of the config it came from."""
    doc = base.to_dict()
    if output_dir is not None:
        doc["train"].update(output_dir=output_dir, overwrite=False)
    lcfg = base.lora
    per_rank = None if lcfg.use_rslora else lcfg.alpha / lcfg.r
    doc["model"].update(head=plan.head, head_rank=plan.head_rank)
    doc["lora"].update(plan.lora_settings(per_rank, lcfg.alpha))
    doc["train"]["max_trainable_params"] = budget
    if doc["train"].get("cache_frozen_prefix") is True and min(plan.layers) == 0:
        # true insists on a frozen prefix, which a plan adapting layer 0 leaves none of: train
        # would refuse the written file. null caches where there is a prefix.
        doc["train"]["cache_frozen_prefix"] = None
    return build_config(doc, where="plan")


def unusable_heads(cfg: Config, label_names: list[str], heads: tuple[str, ...]) -> dict[str, str]:
    """Heads among ``heads`` that training would refuse for this model, with why: the model's own
    head where a local checkpoint lacks its weights (DeBERTa's pooler), a replacement head the
    model has no place for (BART, T5, XLNet...). Counting alone would rank such a plan, and the
    written config would then fail in ``train``."""
    config = load_model_config(cfg.model, label_names)
    out = {}
    for spec in heads:
        if spec == "default":
            gaps = default_head_gaps(cfg.model, config)
            if gaps:
                out[spec] = f"the checkpoint lacks its weights ({first_few(gaps)}), which would stay random " \
                            "(train refuses it)"
            elif not has_local_weights(cfg.model) and not trained_head_params(skeleton(cfg.model, config, spec, None)):
                # XLM, T5, BART: PEFT trains a head only by those names. From a base checkpoint the
                # head would be random and frozen (train refuses it, after the download).
                out[spec] = (f"PEFT trains none of this model's own head (no module named "
                             f"{' or '.join(CLASSIFIER_ATTRS)}): it would keep the checkpoint's weights, random in a "
                             "base model")
            continue
        try:
            skeleton(cfg.model, config, *parse_head(spec))
        except ModelError as e:
            if e.where != "model.head":
                raise  # the model itself cannot be built: no head would do
            out[spec] = e.what
    return out


def nothing_fits_fix(arch: Architecture, budget: int, heads: tuple[str, ...], min_rank: int,
                     use_dora: bool = False) -> str:
    """What would let a plan fit, where :func:`enumerate_plans` found none: the smallest plan
    there is (the cheapest head alone understated it: LoRA at ``min_rank`` costs more)."""
    largest = max((min(s.in_features, s.out_features) for s in arch.sites), default=0)
    if min_rank > largest:
        return f"lower --min-rank to at most {largest}, the largest LoRA rank this model's layers allow"
    smallest = min(enumerate_plans(arch, 2**62, heads, min_rank, min_rank, use_dora), key=lambda p: p.trainable)
    return (f"raise --budget to at least {smallest.trainable:,} (the smallest plan: {smallest.head_label} head, "
            f"LoRA r={min_rank} on {smallest.role_set}, {smallest.layer_set}), or lower --min-rank")


def make_plans(cfg: Config, label_names: list[str], budget: int, heads: tuple[str, ...] = DEFAULT_HEADS,
               min_rank: int = 4, max_rank: int = 64) -> tuple[Architecture, list[Plan]]:
    arch = analyze(cfg, label_names, heads)
    return arch, enumerate_plans(arch, budget, heads, min_rank, max_rank, use_dora=cfg.lora.use_dora)


def write_config(cfg: Config, path: str, plan: Plan, source: str | None = None, rank: int = 1, of: int = 1) -> None:
    """Write ``cfg`` as YAML with a header saying what the plan chose and why it fits."""
    import yaml

    head = [
        f"# Written by `loraclf plan --budget {plan.budget}`" + (f" from {source}" if source else "")
        + f": #{rank} of {of} configurations that fit.",
        f"# head {plan.head_label}: {plan.head_params:,} parameters",
        f"# LoRA r={plan.rank_label} on {', '.join(s.path for s in plan.sites)}",
        f"#   of {plan.layer_set}: {plan.lora_params:,} parameters",
        f"# = {plan.trainable:,} trainable ({100 * plan.fill:.1f}% of {plan.budget:,}).",
        f"# Train it: loraclf train --config {path}",
    ]
    text = "\n".join(head) + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    write_text(path, text)
