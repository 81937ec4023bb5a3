"""Classification heads that spend less of the budget than a model's own.

``model.head``:
    default   the model's own head, untouched (roberta-base: dense 768x768 + out_proj 768xC
              = 593,668 parameters for 4 classes; BERT: a linear layer on the pooler output)
    linear    one linear layer on the first token's final hidden state: H*C + C (3,076); on a
              causal model (GPT-2, Llama...) the last real token's, the only one that saw the text
    mean      one linear layer on the mean of the final hidden states over non-pad tokens: H*C + C
    lowrank   the RoBERTa-style two-layer head (first token, as linear -> dense -> tanh -> out_proj) with
              the HxH dense factorised as up(down(x)), rank k = ``model.head_rank``:
              H*k + k*H + H + H*C + C

Design. A head replaces the model's classifier module *before* PEFT wraps the model, under the
attribute name PEFT's SEQ_CLS task already trains and saves (``classifier`` or ``score``, see
``CLASSIFIER_ATTRS``). So PEFT's ``modules_to_save`` trains it, saves it in the adapter file and
restores it on load — loading a run only has to install the same head class first (done in
``model.load_base``) — and LoRA stays plain PEFT.

What a classifier module is *given* differs by architecture: RoBERTa/MPNet/ELECTRA pass it
every hidden state, BERT passes the pooler output (tanh(dense(h_cls)), pretrained for NSP),
DistilBERT the output of its own pre_classifier, and none passes the attention mask that mean
pooling needs. Rather than one code path per architecture, the heads here ignore their input
and read what they need from a tap on the backbone (``model.<base_model_prefix>``, the
encoder every ``*ForSequenceClassification`` calls): a forward pre-hook records the attention
mask, a forward hook the last hidden states (output[0]). The backbone always runs right before
the classifier in the same forward, and the tap keeps its values per thread, so concurrent
forwards of one model (a server) do not mix. For architectures that apply the classifier to
every position and then pick the last non-pad token themselves (``score``: GPT-2, Llama...),
the head's logits are broadcast over positions so that choice returns them unchanged.
"""

from __future__ import annotations

import inspect
import math
import threading
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .errors import ModelError

HEADS = ("default", "linear", "mean", "lowrank")
DEFAULT_HEAD_RANK = 16
# The attribute names PEFT's SEQ_CLS task puts in modules_to_save (PeftModelForSequenceClassification).
CLASSIFIER_ATTRS = ("classifier", "score")
# Architectures whose classifier is applied to every position (the model then picks one).
_PER_TOKEN_ATTRS = ("score",)


class _Tap:
    """The backbone's attention mask and last hidden states of the forward in progress, per
    thread. PEFT deep-copies the classifier (modules_to_save), so a copy must share this."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> _Tap:
        return self

    def put(self, name: str, value: Any) -> None:
        setattr(self._local, name, value)

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = getattr(self._local, "hidden", None)
        mask = getattr(self._local, "mask", None)
        self._local.hidden = self._local.mask = None  # do not keep activations alive
        if hidden is None:
            raise RuntimeError("loraclf head called without a backbone forward before it")
        return hidden, mask


class _TappedHead(nn.Module):
    """Base of the heads: pooled features from the tap, logits out."""

    pooling = "first"

    def __init__(self, tap: _Tap, per_token: bool):
        super().__init__()
        self.tap = tap
        self.per_token = per_token

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T, H] hidden states, [B, T] attention mask -> [B, H]."""
        if self.pooling == "first" and not self.per_token:
            return hidden[:, 0]
        if mask is not None and mask.shape[1] != hidden.shape[1]:
            # a model that pools its sequence between blocks (Funnel): the mask no longer lines up
            raise ModelError(f"the model returns {hidden.shape[1]} hidden states for {mask.shape[1]} tokens: "
                             "the head cannot tell its real tokens from padding", where="model.head",
                             fix="use model.head linear or default with this model")
        if self.pooling == "first":
            # A causal model (the classifiers applied per token: GPT-2, Llama...): only the last
            # real token has seen the whole text; the first is the same for every text (BOS).
            if mask is None:
                return hidden[:, -1]
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (mask.to(positions.dtype) * positions).argmax(dim=1)  # right or left padding alike
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def in_features(self) -> int:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden, mask = self.tap.take()  # ``features`` differs by architecture: see the module docstring
        if hidden.shape[-1] != self.in_features():
            # sized from the config (_hidden_size), which names another width than some models return
            raise ModelError(f"the model's hidden states are {hidden.shape[-1]} wide, the head was sized for "
                             f"{self.in_features()} from its config", where="model.head",
                             fix="use model.head default with this model")
        logits = self.classify(self.pool(hidden, mask))
        if self.per_token:
            logits = logits.unsqueeze(1).expand(-1, hidden.shape[1], -1)
        return logits


class LinearHead(_TappedHead):
    """dropout -> out_proj (H -> C) on the first token (``linear``) or the masked mean (``mean``)."""

    def __init__(self, tap: _Tap, per_token: bool, hidden: int, num_labels: int, dropout: float, pooling: str,
                 init_std: float):
        super().__init__(tap, per_token)
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.out_proj.weight, std=init_std)
        nn.init.zeros_(self.out_proj.bias)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(pooled))

    def in_features(self) -> int:
        return self.out_proj.in_features


class LowRankHead(_TappedHead):
    """RoBERTa's head with its dense layer factorised: dropout -> up(down(x)) -> tanh -> dropout -> out_proj."""

    def __init__(self, tap: _Tap, per_token: bool, hidden: int, num_labels: int, dropout: float, rank: int,
                 init_std: float):
        super().__init__(tap, per_token)
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)
        # down keeps the input's scale, up is scaled so that up @ down has the entry variance of a
        # full dense layer initialised with std init_std (HF's initializer_range).
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(hidden))
        nn.init.normal_(self.up.weight, std=init_std * math.sqrt(hidden / rank))
        nn.init.zeros_(self.up.bias)
        nn.init.normal_(self.out_proj.weight, std=init_std)
        nn.init.zeros_(self.out_proj.bias)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.up(self.down(self.dropout(pooled))))
        return self.out_proj(self.dropout(x))

    def in_features(self) -> int:
        return self.down.in_features


def classifier_attr(model: nn.Module) -> str:
    """The attribute holding ``model``'s classifier, one PEFT trains and saves."""
    for attr in CLASSIFIER_ATTRS:
        if isinstance(getattr(model, attr, None), nn.Module):
            return attr
    raise ModelError(f"cannot find the classifier of {type(model).__name__} (looked for attribute(s) "
                     f"{', '.join(CLASSIFIER_ATTRS)})", where="model.head",
                     fix="use an encoder whose *ForSequenceClassification has one (BERT, RoBERTa, DeBERTa...); "
                         "--model.head default works only where the checkpoint holds the model's own head")


def _hidden_size(config: PretrainedConfig) -> int:
    """The width of the hidden states the heads pool. OPT projects its last hidden state from
    hidden_size down to word_embed_proj_dim (opt-350m: 1024 -> 512), so that name comes first."""
    for attr in ("word_embed_proj_dim", "hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise ModelError(f"cannot tell the hidden size of a '{config.model_type}' model", where="model.head",
                     fix="use --model.head default")


def _dropout(config: PretrainedConfig) -> float:
    for attr in ("classifier_dropout", "hidden_dropout_prob", "summary_first_dropout", "dropout"):
        v = getattr(config, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 0.1


def make_head(kind: str, config: PretrainedConfig, rank: int | None, tap: _Tap | None = None,
              per_token: bool = False) -> nn.Module:
    """A fresh head module (on the current default device)."""
    hidden, labels, std = _hidden_size(config), config.num_labels, float(getattr(config, "initializer_range", 0.02))
    tap = tap or _Tap()
    if kind in ("linear", "mean"):
        return LinearHead(tap, per_token, hidden, labels, _dropout(config), "first" if kind == "linear" else "mean", std)
    if kind == "lowrank":
        return LowRankHead(tap, per_token, hidden, labels, _dropout(config), rank or DEFAULT_HEAD_RANK, std)
    raise ModelError(f"unknown head '{kind}'", where="model.head", fix=f"use one of {', '.join(HEADS)}")


def peft_trains(module_name: str) -> bool:
    """PEFT's SEQ_CLS rule for modules_to_save: a module whose name ends with a CLASSIFIER_ATTRS
    name (``str.endswith``, so DistilBERT's ``pre_classifier`` too) is trained and saved."""
    return module_name.endswith(CLASSIFIER_ATTRS)


def trained_head_params(model: nn.Module) -> int:
    """Parameters PEFT's SEQ_CLS task trains besides LoRA: every module whose name ends with a
    name in CLASSIFIER_ATTRS (PEFT matches modules_to_save with ``str.endswith``), counted once."""
    total, taken = 0, []
    for name, module in model.named_modules():
        if peft_trains(name) and not any(name.startswith(t + ".") for t in taken):
            taken.append(name)
            total += sum(p.numel() for p in module.parameters())
    return total


def _backbone(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise ModelError(f"cannot find the encoder inside {type(model).__name__} to pool its hidden states",
                         where="model.head", fix="use --model.head default")
    return backbone


def install_head(model: nn.Module, kind: str, config: PretrainedConfig, rank: int | None) -> None:
    """Replace ``model``'s classifier by a ``kind`` head (nothing for ``default``). Call before PEFT."""
    if kind == "default":
        return
    if kind == "mean" and getattr(config, "model_type", None) == "funnel":  # (see _TappedHead.pool)
        raise ModelError("model.head mean cannot pool Funnel's hidden states: it shortens the sequence between "
                         "blocks, so they no longer line up with the attention mask", where="model.head",
                         fix="use model.head linear or default with this model")
    attr = classifier_attr(model)
    backbone = _backbone(model)
    old = getattr(model, attr)
    ref = next(old.parameters(), None)
    tap = _Tap()
    mask_pos = _positional_index(backbone, "attention_mask")

    def record_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and mask_pos is not None and len(args) > mask_pos:
            mask = args[mask_pos]
        tap.put("mask", mask)

    def record_hidden(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        tap.put("hidden", output[0])  # last_hidden_state for every HF backbone (tuple or ModelOutput)

    # PEFT trains every module whose name *ends with* 'classifier' or 'score', so DistilBERT's
    # pre_classifier (HxH, 590,592 parameters on distilbert-base) would be trained too, although
    # the new head never reads its output (it reads the backbone). A square Linear there feeds
    # only the old classifier: make it a parameter-free identity.
    for name, child in list(model.named_children()):
        if name != attr and peft_trains(name) and isinstance(child, nn.Linear) \
                and child.in_features == child.out_features:
            setattr(model, name, nn.Identity())
    backbone.register_forward_pre_hook(record_mask, with_kwargs=True)
    backbone.register_forward_hook(record_hidden, with_kwargs=True)
    device = ref.device if ref is not None else torch.device("cpu")
    with torch.device(device):
        head = make_head(kind, config, rank, tap, per_token=attr in _PER_TOKEN_ATTRS)
    if ref is not None:
        head.to(dtype=ref.dtype)
    setattr(model, attr, head)


def _positional_index(module: nn.Module, name: str) -> int | None:
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None
