"""Deterministic batches: which samples, which caption and which augmented view each step uses.

Everything is a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen,
every rank of a torchrun job takes its own slice of the same global batch, and the teacher cache can replay
the view whose embedding it stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmkd.config import ConfigError
from mmkd.data.records import DataError, Record, open_encoded
from mmkd.data.transforms import ImageTransform, TransformConfig, apply_view


def _rng(*parts: int | str) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class ImageBank:
    """Turns records into normalised pixel tensors; in-memory uint8 arrays of the right size skip PIL.

    ``seed`` and ``augmentation`` (TransformConfig's ``scale``, ``ratio``, ``hflip``) decide the crop of view
    v > 0; a teacher cache records them so that a student's bank replays exactly the views it stored.
    """

    def __init__(self, records: Sequence[Record], image_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, seed: int = 0, augmentation: Mapping[str, Any] | None = None) -> None:
        self.records = list(records)
        self.seed = seed
        self.augment = augment
        aug = {k: tuple(v) if isinstance(v, list) else v for k, v in (augmentation or {}).items()}
        self.eval_tf = ImageTransform(TransformConfig(image_size, tuple(mean), tuple(std), train=False))
        self.train_tf = ImageTransform(TransformConfig(image_size, tuple(mean), tuple(std), train=True, **aug))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._stack: torch.Tensor | None = None
        if records and all(isinstance(r.image, np.ndarray) and r.image.shape[:2] == (image_size, image_size)
                           for r in records):
            self._stack = torch.from_numpy(np.stack([r.image for r in records]))  # [N, H, W, 3] uint8

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, indices: Sequence[int], views: Sequence[int] | None = None) -> torch.Tensor:
        """Pixel batch for ``indices``; view 0 is the plain eval transform, view v>0 a replayable augmentation."""
        views = list(views) if views is not None else [0] * len(indices)
        if self._stack is not None and not any(views):
            x = self._stack[torch.as_tensor(list(indices), dtype=torch.long)].permute(0, 3, 1, 2).float() / 255.0
            return (x - self.mean) / self.std
        out = []
        for i, v in zip(indices, views):
            rec = self.records[i]
            img = rec.image if isinstance(rec.image, np.ndarray) else open_encoded(rec)
            out.append(apply_view(self.train_tf, self.eval_tf, img, self.seed, rec.key, v))
        return torch.stack(out)


@dataclass
class TrainBatch:
    pixel_values: torch.Tensor  # paired images first, then unpaired ones
    keys: list[str]
    views: list[int]
    captions: list[str]  # one per paired image
    n_paired: int
    paired_idx: np.ndarray
    unpaired_idx: np.ndarray


class BatchPlan:
    """Global batch ``step`` of an epoch-wise permutation (drop-last), the same in every process."""

    def __init__(self, n: int, global_batch: int, seed: int, name: str) -> None:
        if n < global_batch:
            raise ConfigError(f"{name}: {n} samples is fewer than one global batch of {global_batch}; "
                             "lower the batch size or add data")
        self.n, self.global_batch, self.seed, self.name = n, global_batch, seed, name
        self.per_epoch = n // global_batch

    def indices(self, step: int) -> np.ndarray:
        """The global batch of ``step``; ranks slice it (see TrainData.batch)."""
        epoch, pos = divmod(step, self.per_epoch)
        perm = _rng(self.seed, self.name, epoch).permutation(self.n)
        return perm[pos * self.global_batch:(pos + 1) * self.global_batch]


class TrainData:
    """Paired (captioned) samples plus optional unpaired images, batched deterministically."""

    def __init__(self, paired: ImageBank, unpaired: ImageBank | None, batch_size: int, unpaired_batch_size: int,
                 world: int, seed: int, views: int = 1) -> None:
        for r in paired.records:
            if not r.captions:
                raise DataError(f"{r.origin or r.key}: a paired training sample has no caption")
        if batch_size % world or unpaired_batch_size % world:
            raise ConfigError(f"batch sizes ({batch_size}, {unpaired_batch_size}) must divide by the number of "
                             f"processes ({world})")
        self.paired, self.unpaired = paired, unpaired
        self.seed, self.world, self.views = seed, world, views
        self.plan = BatchPlan(len(paired), batch_size, seed, "paired")
        self.uplan = (BatchPlan(len(unpaired), unpaired_batch_size, seed, "unpaired")
                      if unpaired is not None and unpaired_batch_size > 0 else None)

    def batch(self, step: int, rank: int = 0) -> TrainBatch:
        """Rank ``rank``'s slice of global batch ``step``: captions and views are drawn for the whole global
        batch first, so N processes see exactly what 1 process sees."""
        rng = _rng(self.seed, "choice", step)
        gidx = self.plan.indices(step)
        recs = [self.paired.records[i] for i in gidx]
        gcaps = [r.captions[int(rng.integers(len(r.captions)))] for r in recs]
        gviews = rng.integers(self.views, size=len(gidx)) if self.paired.augment else np.zeros(len(gidx), int)
        local = len(gidx) // self.world
        sl = slice(rank * local, (rank + 1) * local)
        idx, captions, views = gidx[sl], gcaps[sl], [int(v) for v in gviews[sl]]
        pix = [self.paired.pixels(idx, views)]
        keys = [r.key for r in recs[sl]]
        uidx = np.zeros(0, dtype=np.int64)
        if self.uplan is not None and self.unpaired is not None:
            guidx = self.uplan.indices(step)
            guviews = (rng.integers(self.views, size=len(guidx)) if self.unpaired.augment
                       else np.zeros(len(guidx), int))
            ulocal = len(guidx) // self.world
            usl = slice(rank * ulocal, (rank + 1) * ulocal)
            uidx, uviews = guidx[usl], [int(v) for v in guviews[usl]]
            pix.append(self.unpaired.pixels(uidx, uviews))
            keys += [self.unpaired.records[i].key for i in uidx]
            views += uviews
        return TrainBatch(torch.cat(pix), keys, views, captions, len(idx), idx, uidx)
