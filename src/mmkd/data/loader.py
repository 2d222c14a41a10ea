"""Batches decoded in DataLoader workers, identical for any number of workers and processes.

The map-style dataset's item is a training step: item ``s`` is this rank's slice of global batch ``s``
(`TrainData.batch`, a pure function of (seed, step)), and the sampler yields steps ``start, start+1, …``. So a
worker reads, decodes and augments whole batches while the model trains on earlier ones; DataLoader returns
items in sampler order whatever the number of workers; and resuming at step s is starting the sampler at s: exact
mid-epoch resume with no loader state to save. Workers are forked (no pickling of the data plane) and hold
only the data's O(shards) index, their open shard files and the batches in flight.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Generic, Protocol, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmkd.errors import MmkdError

B = TypeVar("B")


class StepBatches(Protocol[B]):
    """What the loader needs of a data plane (``batches.TrainData``): a rank's raw batch of a step, built in a
    worker, and its finishing touch in the training process. A protocol, so the loader sits below the batches."""

    def raw_batch(self, step: int, rank: int = 0) -> B: ...

    def normalized(self, batch: B, device: torch.device | None = None) -> B: ...


def default_workers(streaming: bool) -> int:
    """``data.workers: null``: in-process for data held in memory (decoding is trivial or the set is tiny);
    for shards, one worker per two cores (at least 1, at most 8), leaving the rest to the model's threads."""
    if not streaming:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class StepDataset(Dataset, Generic[B]):
    """Item ``step`` = rank ``rank``'s batch of global step ``step``."""

    def __init__(self, data: StepBatches[B], rank: int) -> None:
        self.data, self.rank = data, rank

    def __getitem__(self, step: int) -> B | Failure:
        try:
            return self.data.raw_batch(int(step), self.rank)  # uint8 pixels: `_finished` normalises them
        except MmkdError as e:  # sent back whole: DataLoader would re-raise it with a worker traceback inside
            return Failure(e)


@dataclass
class Failure:
    """An mmkd error met while building a batch (a sample that cannot be decoded, a shard gone), re-raised as is
    by the training process so its one-line message (naming shard and key) reaches the user unchanged."""

    error: MmkdError


class StepSampler(Sampler[int]):
    """Steps ``start..stop-1`` in order: where the loader starts is the only state a resume needs."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _worker_init(parent: int, _: int) -> None:
    torch.set_num_threads(1)  # workers decode with PIL; torch threads in each would oversubscribe the cores
    _die_with(parent)


def _die_with(parent: int) -> None:
    """Linux: the kernel SIGKILLs this worker when the training process dies. A forked worker shares the training
    process's open files, its run folder's lock among them (a flock belongs to the open file, not the process):
    outliving a SIGKILLed run by the seconds DataLoader takes to notice, it would make a ``--resume`` started at
    once find the folder locked."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def iterate_batches(data: StepBatches[B], start: int, stop: int, rank: int = 0, workers: int = 0, prefetch: int = 2,
                    device: torch.device | None = None) -> Iterator[B]:
    """This rank's batches of steps ``start..stop-1``; ``workers`` > 0 decodes them in that many processes.

    Transport: workers send uint8 pixels (a quarter of float32's bytes through shared memory), pinned in the
    training process when ``device`` is a GPU; they are normalised on ``device`` (default: where they are) as
    each batch is taken. ``prefetch`` batches per worker are decoded ahead: an item is a whole batch, so 2 already
    keeps 2 × workers batches in flight, enough to ride out a slow batch without holding many in memory."""
    if workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {workers}")
    loader = DataLoader(StepDataset(data, rank), batch_size=None, sampler=StepSampler(start, stop),
                        num_workers=workers, collate_fn=_identity,
                        worker_init_fn=partial(_worker_init, os.getpid()) if workers else None,
                        prefetch_factor=prefetch if workers else None, persistent_workers=False,
                        multiprocessing_context="fork" if workers else None,
                        # its own generator: DataLoader draws a worker base seed at every iterator, which from the
                        # global RNG would shift the training's dropout draws by one after a resume
                        generator=torch.Generator().manual_seed(0),
                        pin_memory=device is not None and device.type == "cuda")
    return _finished(iter(loader), data, device)


def _finished(batches: Iterator[B | Failure], data: StepBatches[B], device: torch.device | None) -> Iterator[B]:
    for b in batches:
        if isinstance(b, Failure):
            raise b.error
        yield data.normalized(b, device)


def _identity(batch: B | Failure) -> B | Failure:
    return batch
