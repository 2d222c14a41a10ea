"""Data parallelism without DDP's reducer: rank 0's weights to every rank once, the gradients averaged once per
optimizer step.

Why not ``DistributedDataParallel``: its reducer expects every trainable parameter to get a gradient in the
backward of each of its forwards (``find_unused_parameters=False`` stops at step 2 otherwise: fd_* alone, rkd,
kl with a fixed scale, ``towers: [image]``, ``level: features``…), and exact accumulation gives the objectives'
parameters their gradients outside any student forward, then runs k backward passes of which only the sum
matters. Averaging every ``.grad`` after the last backward is exact for both, whatever a step leaves unused; a
parameter no rank gave a gradient keeps ``grad = None`` (the optimizer skips it, as in one process). The cost:
no overlap of communication with the backward (one all-reduce of the gradients per step, in buckets).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mmkd.dist import world_size

BUCKET_ELEMENTS = 1 << 24  # 64 MiB of fp32 per all-reduce


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set to rank ``src``'s (as DDP does when it wraps a module)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Every ``.grad`` replaced by its mean over ranks (a missing one counts as zero where another rank has one)."""
    world = world_size()
    if world == 1 or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple[torch.device, torch.dtype], list[list[nn.Parameter]]] = {}
    for p in live:
        groups = buckets.setdefault((p.grad.device, p.grad.dtype), [[]])
        if groups[-1] and sum(q.numel() for q in groups[-1]) + p.numel() > BUCKET_ELEMENTS:
            groups.append([])
        groups[-1].append(p)
    for groups in buckets.values():
        for group in groups:
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in group:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
