"""A teacher ensemble's targets: every member answers the batch, and the objectives get one target dict per
teacher (``{"members": [...]}``; see ``mmkd.objectives.ensemble``).

Online members run on the batch (a member whose image size and normalisation differ from the first's decodes its
own pixels); cached members are looked up in the DataLoader workers like a single cache, and must replay the same
views (count, seed, augmentation, transform version), else training would pair one teacher's view with another's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from mmkd.data.batches import TrainBatch
from mmkd.devices import to_device
from mmkd.teacher.cache import CachedTeacher, CacheError

MEMBERS = "members"  # the targets of an ensemble: {"members": [teacher 0's targets, teacher 1's, …]}


class EnsembleTargets:
    """Each member's targets for the batch, in order. own_pixels[i]: member i decodes its own pixels (its image
    size or normalisation differs from the pixels the batch carries for the first member)."""

    def __init__(self, members: Sequence[Callable[[TrainBatch], dict[str, Any]]],
                 own_pixels: Sequence[bool] | None = None) -> None:
        self.members = list(members)
        self.own_pixels = list(own_pixels or [False] * len(self.members))

    def __call__(self, batch: TrainBatch) -> dict[str, Any]:
        return {MEMBERS: [m(replace(batch, teacher_pixels=None) if own else batch)
                          for m, own in zip(self.members, self.own_pixels)]}


def targets_to(targets: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Targets (one teacher's, or an ensemble's list of them) with every tensor on ``device``."""
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return to_device(v, device)
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return move(targets)


AGREE = (("views", lambda c: c.views), ("transform.view_seed", lambda c: c.view_seed),
         ("transform.augmentation", lambda c: c.augmentation),
         ("transform.version", lambda c: c.info.transform_version))


def check_agreement(caches: Sequence[CachedTeacher]) -> None:
    """Refuse caches that replay different views: training draws one view per sample for every teacher."""
    first = caches[0]
    for other in caches[1:]:
        for field, get in AGREE:
            a, b = get(first), get(other)
            if a != b:
                raise CacheError(f"teacher caches {first.root} and {other.root} differ in {field} ({a!r} vs {b!r}): "
                                 "an ensemble's caches must replay the same views; rebuild one with the other's "
                                 "`mmkd cache` settings (--views, --seed)")


class EnsembleLookup:
    """Several caches answering one batch (picklable: each DataLoader worker opens its own maps)."""

    def __init__(self, caches: Sequence[CachedTeacher]) -> None:
        self.caches = list(caches)

    def __call__(self, batch: TrainBatch) -> dict[str, Any]:
        return {MEMBERS: [c(batch) for c in self.caches]}
