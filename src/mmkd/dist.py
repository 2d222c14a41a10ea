"""torchrun/DDP helpers: one code path for 1 process and N processes (gloo for CPU tensors, nccl for CUDA ones)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmkd.devices import local_rank, resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device | str) -> str:
    """The collective backend for tensors on ``device``: nccl moves CUDA tensors, gloo CPU ones (nccl refuses
    them, so a CPU run on a GPU machine must use gloo)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: torch.device | str | None = None) -> DistInfo:
    """Join the process group torchrun set up (env vars), or run single-process when there is none.

    device: where this process's tensors live (default: ``auto``, i.e. ``cuda:LOCAL_RANK`` where CUDA exists);
    it picks the backend, and a CUDA device becomes this process's current device before nccl starts.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo()
    if not dist.is_initialized():
        where = torch.device(device) if device is not None else resolve_device("auto")
        if where.type == "cuda":
            torch.cuda.set_device(where)
        dist.init_process_group(backend=backend_for(where))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank())


def _comm_device() -> torch.device:
    """Where the small tensors of the helpers below must be: nccl collectives take CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping gradients to every rank's own slice.

    Every rank computes the loss on the gathered (global) batch; the backward sums the ranks' gradients for
    each slice, and DDP's averaging then gives exactly the single-process gradient of the global batch.
    Equal local batch sizes are assumed (the batch plan guarantees them).
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a detached scalar over ranks, for logging the same number on every rank."""
    if world_size() == 1:
        return x
    y = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(y)
    return (y / world_size()).to(x.device)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (e.g. the step rank 0 resumes from)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank, so all ranks take the same branch."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order on rank 0 (other ranks get ``[obj]``); all ranks must call it."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out if out is not None else [obj]
