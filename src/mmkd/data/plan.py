"""Which samples global batch ``step`` holds: a pure function of (seed, step), in O(shards + window) memory.

An epoch visits every sample once (the last partial batch dropped, as before): the shard order is permuted by
(seed, epoch), the permuted shards are cut into windows of ``window`` consecutive shards, and the samples of each
window are permuted by (seed, epoch, window). So each shard is read within one window per epoch (a remote
shard is fetched once per epoch), and computing a batch needs the O(shards) counts plus one window's permutation
(at most two: a batch may straddle two windows), never an array over the whole dataset. A source held in memory
is one shard, whose single window is the plain epoch permutation mmkd always used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from mmkd.errors import ConfigError

DEFAULT_WINDOW = 8  # shards per shuffle window: enough mixing for shards of thousands, little to fetch at once


def rng_of(*parts: int | str) -> np.random.Generator:
    """A generator drawn from a stable hash of ``parts`` (the same in every process and Python)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class ShardPlan:
    """Global batch ``step`` (drop-last epochs) over shards of ``counts`` samples, the same in every process."""

    def __init__(self, counts: np.ndarray | list[int], global_batch: int, seed: int, name: str,
                 window: int = DEFAULT_WINDOW) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        if self.n < global_batch:
            raise ConfigError(f"{name}: {self.n} samples is fewer than one global batch of {global_batch}; "
                              "lower the batch size or add data")
        if window < 1:
            raise ConfigError(f"data.shard_window must be at least 1, got {window}")
        self.global_batch, self.seed, self.name, self.window = global_batch, seed, name, window
        self.per_epoch = self.n // global_batch
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, window starts)
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and the epoch positions where each window starts (O(shards))."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = (np.arange(1) if len(self.counts) == 1
                     else rng_of(self.seed, self.name, epoch, "shards").permutation(len(self.counts)))
            sizes = self.counts[order]
            per_window = np.add.reduceat(sizes, np.arange(0, len(sizes), self.window)) if len(sizes) else sizes
            starts = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def window_samples(self, epoch: int, w: int) -> np.ndarray:
        """Global sample indices of window ``w`` of ``epoch``, in the order the epoch visits them."""
        key = (epoch, w)
        got = self._windows.get(key)
        if got is not None:
            return got
        order, _ = self._layout(epoch)
        shards = order[w * self.window:(w + 1) * self.window]
        members = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in shards])
        # one shard (a source in memory): the permutation mmkd has always drawn, so in-memory runs are unchanged
        rng = (rng_of(self.seed, self.name, epoch) if len(self.counts) == 1
               else rng_of(self.seed, self.name, epoch, "window", w))
        got = members[rng.permutation(len(members))]
        self._windows[key] = got
        while len(self._windows) > 2:
            self._windows.popitem(last=False)
        return got

    def indices(self, step: int) -> np.ndarray:
        """The global batch of ``step`` (global sample indices); ranks slice it (see TrainData.batch)."""
        epoch, pos = divmod(step, self.per_epoch)
        lo, hi = pos * self.global_batch, (pos + 1) * self.global_batch
        _, starts = self._layout(epoch)
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        parts = [self.window_samples(epoch, w)[max(lo, starts[w]) - starts[w]:min(hi, starts[w + 1]) - starts[w]]
                 for w in range(first, last + 1)]
        return np.concatenate(parts)
