"""Exact gradient accumulation (GradCache, Gao et al. 2021; open_clip's ``accum_freq``), for every objective.

``train.accumulate: k`` with micro-batches of b samples gives the gradients of ONE batch of k·b samples: batch-
level objectives (contrastive negatives, KL rows, relations) span all k·b samples, not b. Three passes:

1. the student's per-sample outputs (`DistillTask.outputs`) of every micro-batch, without a graph, each after
   recording the RNG state, so the replay in 3 draws the same dropout and patch masks;
2. the loss (`DistillTask.loss`) on the whole k·b batch against leaf copies of those outputs: the objectives'
   parameters (learnable maps, scales) and the projections get their gradients here, once, and the leaves the
   gradient of the whole batch's loss;
3. each micro-batch's forward again, with a graph, and the cached leaf gradients pushed back through it.

Memory stays that of one micro-batch's graph plus the k·b outputs; the price is one extra student forward per
micro-batch (a frozen text tower's is not repeated). Under torchrun the objectives gather the k·b outputs across
ranks as they do for one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmkd.data.batches import TrainBatch
from mmkd.devices import autocast

Micro = tuple[TrainBatch, dict[str, Any]]  # a micro-batch and its teacher targets


def merge(parts: list[torch.Tensor], n_paired: list[int]) -> torch.Tensor:
    """Per-sample tensors of several micro-batches as one batch: every micro-batch's paired rows first (rows
    ``[:n_paired]``), then the rest (unpaired images, synthetic captions of unpaired images), as a batch of
    k·b samples lays them out."""
    heads = [p[: min(n, p.shape[0])] for p, n in zip(parts, n_paired)]
    tails = [p[min(n, p.shape[0]):] for p, n in zip(parts, n_paired)]
    return torch.cat(heads + tails)


def split(whole: torch.Tensor, lengths: list[int], n_paired: list[int], i: int) -> torch.Tensor:
    """Micro-batch ``i``'s rows of a tensor `merge` built from parts of ``lengths`` rows."""
    heads = [min(n, m) for m, n in zip(lengths, n_paired)]
    h0 = sum(heads[:i])
    t0 = sum(heads) + sum(m - h for m, h in zip(lengths[:i], heads[:i]))
    return torch.cat([whole[h0:h0 + heads[i]], whole[t0:t0 + lengths[i] - heads[i]]])


def merge_targets(parts: list[Any], n_paired: list[int]) -> Any:
    """Teacher targets of several micro-batches as one batch's (per teacher of an ensemble); batch-independent
    values (a logit scale) are taken from the first."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: merge_targets([p[k] for p in parts], n_paired) for k in first}
    if isinstance(first, list):  # an ensemble's members
        return [merge_targets([p[j] for p in parts], n_paired) for j in range(len(first))]
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return merge(parts, n_paired)
    return first


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulated_backward(task: Any, micros: list[Micro], precision: str, amp_device: torch.device,
                         scale: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, torch.Tensor]:
    """Backward of the loss of ``micros`` taken as one batch (gradients land in ``.grad``, added to what is there);
    returns the terms of that batch's loss (detached). scale: the grad scaler's ``scale`` under fp16."""
    if len(micros) == 1:  # one batch: no caching needed
        batch, targets = micros[0]
        with autocast(amp_device, precision):
            terms = task(batch, targets)
        scale(terms["loss"]).backward()
        return {k: v.detach() for k, v in terms.items()}
    n_paired = [b.n_paired for b, _ in micros]
    # 1. outputs without a graph; buffers (batch-norm statistics) restored, so only the replay updates them
    buffers = {n: b.clone() for n, b in task.named_buffers()}
    states, outs = [], []
    with torch.no_grad():
        for batch, _ in micros:
            states.append(_rng_state(amp_device))
            with autocast(amp_device, precision):
                outs.append(task.outputs(batch))
    after = _rng_state(amp_device)
    with torch.no_grad():
        for n, b in task.named_buffers():
            b.copy_(buffers[n])
    # 2. the loss of the whole batch on leaf copies of the outputs
    lengths = {k: [o[k].shape[0] for o in outs] for k in outs[0]}
    leaves = {k: merge([o[k] for o in outs], n_paired).detach().requires_grad_(True) for k in outs[0]}
    del outs
    targets = merge_targets([t for _, t in micros], n_paired)
    with autocast(amp_device, precision):
        terms = task.loss(leaves, targets, sum(n_paired))
    scale(terms["loss"]).backward()
    # 3. replay each micro-batch's forward and push the whole batch's gradients through it
    for i, (batch, _) in enumerate(micros):
        _set_rng_state(states[i], amp_device)
        with autocast(amp_device, precision):
            out = task.outputs(batch, replay=True)
        pairs = [(out[k], split(leaves[k].grad, lengths[k], n_paired, i)) for k in out
                 if out[k].requires_grad and leaves[k].grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
    _set_rng_state(after, amp_device)
    return {k: v.detach() for k, v in terms.items()}
