"""Which numeric precision to compute in, and the autocast context for it.

"auto" picks bf16 autocast where the hardware runs bf16 matrix products natively (CUDA GPUs
that support it; CPUs with AVX512-BF16 or AMX), fp32 elsewhere. Trainable weights stay fp32
either way (the optimizer and the saved adapter are unchanged); frozen matrices that only ever
enter bf16 products may be held in bf16 (``cast_frozen_matmul_weights``), which autocast would
otherwise cast anew at every step.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .errors import ConfigError


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve "auto" to "bf16" or "fp32" for ``device``; reject bf16 where it cannot run."""
    if requested not in ("auto", "fp32", "bf16"):  # a library caller's "fp16" ran silently in fp32
        raise ConfigError([f"precision {requested!r} is not one of auto, fp32, bf16"], where="precision",
                          fix="use auto, fp32 or bf16")
    if device.type == "cuda":
        # pre-Ampere GPUs (V100, T4) emulate bf16, much slower than fp32: auto must not pick it
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=requested == "bf16")
    elif device.type == "cpu":
        bf16_ok = cpu_has_native_bf16() or requested == "bf16"  # CPUs emulate bf16 when asked explicitly
    else:
        bf16_ok = False
    if requested == "auto":
        return "bf16" if bf16_ok else "fp32"
    if requested == "bf16" and not bf16_ok:
        raise ConfigError([f"precision bf16 is not supported on {device}"], where="train.precision",
                          fix="use --train.precision fp32 or auto")
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cast_frozen_matmul_weights(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen weights and biases of linear layers in ``dtype``; returns how many
    tensors were cast.

    Under autocast every matrix product casts its fp32 weight to bf16, and autocast caches that
    cast only for tensors that require grad: a frozen base weight is cast again in every forward
    (the profile showed aten::copy_ at 6 % of CPU time on roberta-base, and on a GPU each cast
    is a kernel launch). Autocast would hand the matmul exactly these bf16 values, so results
    do not change; LoRA matrices, the head, embeddings and LayerNorm stay float32.

    An adapter loaded for inference is frozen too, yet stays float32, as training held it: DoRA
    reads its LoRA matrices outside a matrix product (the norm of W + BA), where their dtype
    changes the result (evaluate missed a DoRA run's recorded loss by 2e-6)."""
    cast = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or _adapter_owned(name):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += 1
    return cast


def _adapter_owned(module_name: str) -> bool:
    """Whether PEFT trains this module: a LoRA matrix (``...lora_A.default``) or the trained copy
    of a head (``...modules_to_save.default...``), as opposed to the frozen base model."""
    return any(part.startswith("lora_") or part == "modules_to_save" for part in module_name.split("."))
