"""Where tensors live and in which precision they are computed: one place that reads ``auto | cpu | cuda |
cuda:N`` and ``fp32 | bf16 | fp16`` for training, the cache, evaluation and the studies.

Why a module of its own: the choice of device decides the process-group backend (``mmkd.dist``), the autocast
device type and the grad scaler, and every command takes the same option; deciding it in one place keeps a CPU
run on a GPU machine a CPU run everywhere (the process group, autocast and the data copies).
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from mmkd.errors import MmkdError

DEVICE_SPECS = "auto, cpu, cuda, cuda:N"
PRECISIONS = ("fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(MmkdError, ValueError):
    """A device that is malformed or absent on this machine; the message names the option or config key."""


def check_device_spec(spec: Any, key: str = "train.device") -> str:
    """``spec`` when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; otherwise a DeviceError naming ``key``."""
    m = _DEVICE.match(spec) if isinstance(spec, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"{key}: {spec!r} is not a device; use one of {DEVICE_SPECS}")
    return spec


def local_rank() -> int:
    """This process's GPU slot under torchrun (``LOCAL_RANK``), 0 without torchrun."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def resolve_device(spec: str = "auto", key: str = "train.device", rank: int | None = None) -> torch.device:
    """The torch device of ``spec``: ``auto`` is ``cuda:LOCAL_RANK`` where CUDA exists, else the CPU; ``cuda``
    is ``cuda:LOCAL_RANK`` (one GPU per torchrun process). Asking for a GPU that is not there fails naming
    ``key``, before any model is loaded."""
    check_device_spec(spec, key)
    kind, _, index = spec.partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if kind == "auto":
            return torch.device("cpu")
        raise DeviceError(f"{key}: {spec!r} asks for a GPU, but torch finds no CUDA device on this machine "
                          f"(torch {torch.__version__}); use cpu or auto")
    slot = int(index) if index else (local_rank() if rank is None else rank)
    count = torch.cuda.device_count()
    if slot >= count:
        raise DeviceError(f"{key}: cuda:{slot} asked for, but this machine has {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", slot)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters are (the CPU for one without parameters): autocast and inputs follow it."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def check_precision(precision: Any, key: str = "train.precision") -> str:
    if precision not in PRECISIONS:
        raise DeviceError(f"{key}: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """Mixed precision for ``precision`` on ``device``'s type (the parameters' device, never a guess from
    ``torch.cuda.is_available()``); fp32 computes as written."""
    check_precision(precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (its gradients underflow without one), None otherwise. Works on CPU too (torch ≥ 2.3)."""
    return torch.amp.GradScaler(device.type) if check_precision(precision) == "fp16" else None


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; a CPU tensor bound for a GPU goes through pinned memory, copied without blocking, so
    the copy overlaps the step already queued on the GPU."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
