"""Deterministic batches: which samples, which caption and which augmented view each step uses.

Everything is a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen,
every rank of a torchrun job takes its own slice of the same global batch, and the teacher cache can replay
the view whose embedding it stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from mmkd.data.loader import iterate_batches
from mmkd.data.plan import DEFAULT_WINDOW, ShardPlan
from mmkd.data.plan import rng_of as _rng
from mmkd.data.records import DataError, Record, open_encoded
from mmkd.data.transforms import ImageTransform, TransformConfig, apply_view_pixels
from mmkd.errors import ConfigError


def in_memory(records: Sequence[Record]) -> bool:
    """Whether ``records`` are all held (a list), as opposed to read on demand from shards."""
    return isinstance(records, list)


def shard_counts(records: Sequence[Record]) -> list[int] | np.ndarray:
    """Samples per shard: a sharded source's layout, or one "shard" for records held in memory."""
    counts = getattr(records, "shard_counts", None)
    return counts if counts is not None else [len(records)]


class ImageBank:
    """Turns records into normalised pixel tensors; in-memory uint8 arrays of the right size skip PIL.

    ``seed`` and ``augmentation`` (TransformConfig's ``scale``, ``ratio``, ``hflip``) decide the crop of view
    v > 0; a teacher cache records them so that a student's bank replays exactly the views it stored.
    """

    def __init__(self, records: Sequence[Record], image_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, seed: int = 0, augmentation: Mapping[str, Any] | None = None) -> None:
        self.records = list(records) if not hasattr(records, "shard_counts") else records  # sharded: stays lazy
        self.seed = seed
        self.augment = augment
        aug = {k: tuple(v) if isinstance(v, list) else v for k, v in (augmentation or {}).items()}
        self.eval_tf = ImageTransform(TransformConfig(image_size, tuple(mean), tuple(std), train=False))
        self.train_tf = ImageTransform(TransformConfig(image_size, tuple(mean), tuple(std), train=True, **aug))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._stack: torch.Tensor | None = None
        if in_memory(self.records) and records and all(
                isinstance(r.image, np.ndarray) and r.image.shape[:2] == (image_size, image_size) for r in records):
            self._stack = torch.from_numpy(np.stack([r.image for r in records]))  # [N, H, W, 3] uint8

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, indices: Sequence[int], views: Sequence[int] | None = None) -> torch.Tensor:
        """Pixel batch for ``indices``; view 0 is the plain eval transform, view v>0 a replayable augmentation."""
        views = list(views) if views is not None else [0] * len(indices)
        if self._stack is not None and not any(views):
            x = self._stack[torch.as_tensor(list(indices), dtype=torch.long)].permute(0, 3, 1, 2).float() / 255.0
            return (x - self.mean) / self.std
        return self.pixels_of([self.records[int(i)] for i in indices], views)

    def pixels_of(self, records: Sequence[Record], views: Sequence[int]) -> torch.Tensor:
        """Pixel batch for records already read (of this bank or not) at ``views``."""
        return self.normalize(self.raw_pixels_of(records, views))

    def raw_pixels_of(self, records: Sequence[Record], views: Sequence[int]) -> torch.Tensor:
        """`pixels_of` before normalisation: uint8 [B, 3, H, W], written straight into one buffer."""
        size = self.eval_tf.cfg.image_size
        out = np.empty((len(records), 3, size, size), dtype=np.uint8)
        for i, (rec, v) in enumerate(zip(records, views)):
            img = rec.image if isinstance(rec.image, np.ndarray) else open_encoded(rec)
            out[i] = apply_view_pixels(self.train_tf, self.eval_tf, img, self.seed, rec.key, v).transpose(2, 0, 1)
        return torch.from_numpy(out)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels of this bank's views → the model's normalised float32 ones (float pixels pass as they are)."""
        return self.eval_tf.normalize(pixels) if pixels.dtype == torch.uint8 else pixels

    def same_normalization(self, other: ImageBank) -> bool:
        return self.eval_tf.cfg.mean == other.eval_tf.cfg.mean and self.eval_tf.cfg.std == other.eval_tf.cfg.std


@dataclass
class TrainBatch:
    pixel_values: torch.Tensor  # paired images first, then unpaired ones
    keys: list[str]
    views: list[int]
    captions: list[str]  # one per paired image
    n_paired: int
    paired_idx: np.ndarray
    unpaired_idx: np.ndarray
    teacher_pixels: torch.Tensor | None = None  # the same samples and views at the online teacher's resolution
    targets: dict[str, Any] | None = None  # teacher targets looked up where the batch was built (`TrainData.lookup`)
    # data.synthetic_captions: one drawn synthetic caption per image of keys[:len(synthetic)] and which of its N
    synthetic: list[str] | None = None
    synthetic_idx: list[int] | None = None

    def pin_memory(self) -> TrainBatch:
        """DataLoader's ``pin_memory`` hook: the pixels in page-locked memory, for non-blocking copies to a GPU."""
        return replace(self, pixel_values=self.pixel_values.pin_memory(),
                       teacher_pixels=None if self.teacher_pixels is None else self.teacher_pixels.pin_memory())


class TrainData:
    """Paired (captioned) samples plus optional unpaired images, batched deterministically.

    teacher_banks: the online teacher's (paired, unpaired) banks, so the batch carries the teacher's pixels too
    and both are decoded in the DataLoader workers. window: shards per shuffle window (see `mmkd.data.plan`).
    lookup: a teacher that answers from stored targets (a teacher cache, memory-mapped per process): each batch
    carries ``lookup(batch)``, computed where the batch is built, so DataLoader workers do the lookups and the
    training process none.
    """

    def __init__(self, paired: ImageBank, unpaired: ImageBank | None, batch_size: int, unpaired_batch_size: int,
                 world: int, seed: int, views: int = 1, window: int = DEFAULT_WINDOW,
                 teacher_banks: tuple[ImageBank, ImageBank | None] | None = None,
                 lookup: Callable[[TrainBatch], dict[str, Any]] | None = None,
                 synthetic: Callable[[list[str], int], tuple[list[str], list[int]]] | None = None) -> None:
        if in_memory(paired.records):  # sharded records are checked as they are read (and when indexed)
            for r in paired.records:
                if not r.captions:
                    raise DataError(f"{r.origin or r.key}: a paired training sample has no caption")
        if batch_size % world or unpaired_batch_size % world:
            raise ConfigError(f"batch sizes ({batch_size}, {unpaired_batch_size}) must divide by the number of "
                             f"processes ({world})")
        self.paired, self.unpaired = paired, unpaired
        self.seed, self.world, self.views = seed, world, views
        self.teacher_banks = teacher_banks
        self.lookup = lookup
        # (keys, step) → (a synthetic caption per key, its index): `mmkd.teacher.cache.synthetic.SyntheticCaptions`;
        # its ``unpaired`` says whether uncaptioned images draw one too
        self.synthetic = synthetic
        self.plan = ShardPlan(shard_counts(paired.records), batch_size, seed, "paired", window)
        self.uplan = (ShardPlan(shard_counts(unpaired.records), unpaired_batch_size, seed, "unpaired", window)
                      if unpaired is not None and unpaired_batch_size > 0 else None)

    @property
    def streaming(self) -> bool:
        """Whether samples are read from shards on demand (not held in memory)."""
        banks = [b for b in (self.paired, self.unpaired) if b is not None]
        return not all(in_memory(b.records) for b in banks)

    def batch(self, step: int, rank: int = 0) -> TrainBatch:
        """Rank ``rank``'s slice of global batch ``step``: captions and views are drawn for the whole global
        batch first, so N processes see exactly what 1 process sees."""
        return self.normalized(self.raw_batch(step, rank))

    def normalized(self, batch: TrainBatch, device: torch.device | None = None) -> TrainBatch:
        """A `raw_batch` made the model's input: its uint8 pixels moved to ``device`` (non-blocking from pinned
        memory) and normalised there, so a GPU receives a quarter of the bytes and does the arithmetic."""
        def finish(pix: torch.Tensor | None, bank: ImageBank | None) -> torch.Tensor | None:
            if pix is None or bank is None:
                return pix
            if device is not None and pix.device != device:
                pix = pix.to(device, non_blocking=pix.is_pinned())
            return bank.normalize(pix)

        return replace(batch, pixel_values=finish(batch.pixel_values, self.paired),
                       teacher_pixels=finish(batch.teacher_pixels, self.teacher_banks[0] if self.teacher_banks
                                             else None))

    def raw_batch(self, step: int, rank: int = 0) -> TrainBatch:
        """`batch` with decoded pixels left uint8 (what a DataLoader worker builds and sends): `normalized`
        turns it into `batch`'s floats, bit for bit."""
        rng = _rng(self.seed, "choice", step)
        gidx = self.plan.indices(step)
        local = len(gidx) // self.world
        sl = slice(rank * local, (rank + 1) * local)
        # captions are drawn for the whole global batch (one draw per sample, in order): read only this
        # rank's records, but draw every sample's choice so the stream of draws is the same on every rank
        draws = rng.random(len(gidx))
        gviews = rng.integers(self.views, size=len(gidx)) if self.paired.augment else np.zeros(len(gidx), int)
        idx, views = gidx[sl], [int(v) for v in gviews[sl]]
        recs = [self.paired.records[int(i)] for i in idx]
        captions = []
        for r, u in zip(recs, draws[sl]):
            if not r.captions:
                raise DataError(f"{r.origin or r.key}: a paired training sample has no caption")
            captions.append(r.captions[int(u * len(r.captions))])
        pix = [(self.paired, _pixels(self.paired, idx, recs, views))]
        tpix = ([(self.teacher_banks[0], _pixels(self.teacher_banks[0], idx, recs, views))]
                if self.teacher_banks is not None else [])
        keys = [r.key for r in recs]
        uidx = np.zeros(0, dtype=np.int64)
        if self.uplan is not None and self.unpaired is not None:
            guidx = self.uplan.indices(step)
            guviews = (rng.integers(self.views, size=len(guidx)) if self.unpaired.augment
                       else np.zeros(len(guidx), int))
            ulocal = len(guidx) // self.world
            usl = slice(rank * ulocal, (rank + 1) * ulocal)
            uidx, uviews = guidx[usl], [int(v) for v in guviews[usl]]
            urecs = [self.unpaired.records[int(i)] for i in uidx]
            pix.append((self.unpaired, _pixels(self.unpaired, uidx, urecs, uviews)))
            if self.teacher_banks is not None and self.teacher_banks[1] is not None:
                tpix.append((self.teacher_banks[1], _pixels(self.teacher_banks[1], uidx, urecs, uviews)))
            keys += [r.key for r in urecs]
            views += uviews
        batch = TrainBatch(_join(pix), keys, views, captions, len(idx), idx, uidx, _join(tpix) if tpix else None)
        if self.synthetic is not None:  # a pure function of (seed, key, step): any worker or rank draws the same
            skeys = keys if getattr(self.synthetic, "unpaired", False) else keys[:len(idx)]
            batch.synthetic, batch.synthetic_idx = self.synthetic(skeys, step)
        if self.lookup is not None:  # in the worker that built the batch: keys, views and captions, no pixels
            batch.targets = self.lookup(batch)
        return batch

    def batches(self, start: int, stop: int, rank: int = 0, workers: int = 0, prefetch: int = 2,
                device: torch.device | None = None) -> Iterator[TrainBatch]:
        """Batches ``start..stop-1`` of this rank, decoded by ``workers`` DataLoader processes (0: in this one),
        their pixels normalised on ``device`` (default: the CPU)."""
        return iterate_batches(self, start, stop, rank, workers, prefetch, device)


def _pixels(bank: ImageBank, idx: np.ndarray, recs: list[Record], views: list[int]) -> torch.Tensor:
    """A bank's pixels of records already read: uint8 where decoded; banks of model-sized arrays held in memory
    keep their stacked (float) fast path."""
    if bank._stack is not None and not any(views):
        return bank.pixels(idx, views)
    return bank.raw_pixels_of(recs, views)


def _join(parts: list[tuple[ImageBank, torch.Tensor]]) -> torch.Tensor:
    """The banks' pixels in one tensor: uint8 when every part is uint8 and normalised alike (the first bank's
    `normalize` finishes it), else each part normalised by its own bank here."""
    first = parts[0][0]
    if len(parts) == 1:
        return parts[0][1]
    if all(p.dtype == torch.uint8 and first.same_normalization(b) for b, p in parts):
        return torch.cat([p for _, p in parts])
    return torch.cat([b.normalize(p) for b, p in parts])
