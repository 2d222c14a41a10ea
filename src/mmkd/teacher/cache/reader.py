"""Reading a teacher cache's rows: ``CacheReader`` maps each chunk's arrays on first use and gathers rows by sample
key, view and caption. Keys are found through the memory-mapped hash index (``index.KeyIndex``), so opening costs
no per-key work and a reader copied into a DataLoader worker opens its own maps there. Whether the cache fits a
training is ``checks``' job; ``read.CachedTeacher`` puts the two together."""

from __future__ import annotations

import mmap
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.teacher.cache.format import (
    DTYPES,
    SEGMENTS,
    CacheError,
    Layout,
    StringTable,
    from_storage,
    kind_of,
    stored_row,
    strings_name,
)
from mmkd.teacher.cache.index import KeyIndex
from mmkd.teacher.cache.info import CacheInfo


def open_maps_budget() -> int:
    """How many shard maps a reader keeps open at once: each map holds a file descriptor, so a quarter of the
    process's open-files limit (at least 8), leaving the rest to data loaders, checkpoints and logs. The limit
    itself is left as the user set it: a library does not change process-wide settings."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 16 if soft == resource.RLIM_INFINITY else max(8, soft // 4)


class CacheReader:
    """The rows of the segments ``manifest`` lists, by sample key (at a view) and by caption; it runs no model.

    Shards and the key index are memory-mapped on first use in each process, so opening is cheap, memory stays
    small, and a pickled or forked copy (a DataLoader worker) opens its own maps; at most ``max_open_maps``
    array maps (default ``open_maps_budget()``) stay open, the least recently read closed first, so a cache of
    any number of files is read within the process's open-files limit.
    """

    def __init__(self, root: Path, info: CacheInfo, manifest: dict[str, Any],
                 max_open_maps: int | None = None) -> None:
        self.root, self.info, self.manifest = root, info, manifest
        segs = manifest["segments"]
        self.folders = [root / SEGMENTS / s["name"] for s in segs]
        self.layouts = [Layout(f, int(s["n_samples"]), int(s["n_captions"]), info.chunk_rows, dict(info.arrays),
                               info.dtype) for f, s in zip(self.folders, segs)]
        self.sample_starts = np.concatenate([[0], np.cumsum([s["n_samples"] for s in segs])]).astype(np.int64)
        self.caption_starts = np.concatenate([[0], np.cumsum([s["n_captions"] for s in segs])]).astype(np.int64)
        self.key_index = KeyIndex(root, manifest["index"], "keys")
        self.caption_index = KeyIndex(root, manifest["index"], "captions")
        self.max_open_maps = max(1, max_open_maps or open_maps_budget())
        self._reset_maps()

    def _reset_maps(self) -> None:
        self._pid = os.getpid()
        self._maps: OrderedDict[tuple[int, str, int], np.ndarray] = OrderedDict()  # least recently read first
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its maps and lock: the copy (e.g. in a spawned DataLoader worker) opens its own."""
        state = self.__dict__.copy()
        for name in ("_maps", "_lock", "_pid"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_maps()

    # -- what the cache holds
    @property
    def n_samples(self) -> int:
        return int(self.sample_starts[-1])

    @property
    def n_captions(self) -> int:
        return int(self.caption_starts[-1])

    @property
    def shards(self) -> list[str]:
        """The data shards it holds a segment of, in row order (``""``: the in-memory records' segment)."""
        return [s["shard"] for s in self.manifest["segments"]]

    @property
    def arrays(self) -> list[str]:
        return list(self.info.arrays)

    @property
    def keys(self) -> list[str]:
        """Every sample key in row order (reads the whole key table: for inspection, not for lookups)."""
        return [k for f in self.folders for k in StringTable(f, "keys").all()]

    @property
    def captions(self) -> list[str]:
        """Every cached caption in row order (each segment's, sorted; for inspection, not for lookups)."""
        return [c for f in self.folders for c in StringTable(f, "captions").all()]

    def locate(self, row: int) -> tuple[int, int]:
        """(segment, row within it) of global sample row ``row``."""
        seg = int(np.searchsorted(self.sample_starts, row, side="right")) - 1
        return seg, row - int(self.sample_starts[seg])

    def digest(self, row: int) -> str:
        seg, local = self.locate(row)
        return StringTable(self.folders[seg], "digests")[local]

    # -- lookups
    def _shard(self, seg: int, chunk: int, array: str) -> np.ndarray:
        if self._pid != os.getpid():  # a forked copy: the parent's maps and lock are not this process's
            self._reset_maps()
        key = (seg, array, chunk)
        with self._lock:
            m = self._maps.get(key)
            if m is not None:
                self._maps.move_to_end(key)
                return m
            lay = self.layouts[seg]
            if array == "syncaps":  # a chunk's synthetic caption table (mmkd.teacher.cache.synthetic)
                m = StringTable(lay.root, strings_name(lay.chunks("syncap")[chunk]))  # type: ignore[assignment]
                self._maps[key] = m
                return m
            c = lay.chunks(kind_of(array))[chunk]
            m = np.load(lay.shard(c, array), mmap_mode="r")
            mm = getattr(m, "_mmap", None)  # rows are read at random: no read-ahead around each one
            if mm is not None and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)
            self._maps[key] = m
            while len(self._maps) > self.max_open_maps:
                # gathers copy rows out, so the least recently read map (and its descriptor) closes once dropped
                self._maps.popitem(last=False)
            return m

    def strings(self, seg: int, chunk: int) -> StringTable:
        """Segment ``seg``'s synthetic caption table of chunk ``chunk`` (kept open with the array maps)."""
        return self._shard(seg, chunk, "syncaps")  # type: ignore[return-value]

    def _gather(self, array: str, rows: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        starts = self.caption_starts if kind_of(array) == "text" else self.sample_starts
        lay0 = self.layouts[0]
        per = lay0.chunk_rows
        seg = np.searchsorted(starts, rows, side="right") - 1
        local = rows - starts[seg]
        cidx, off = local // per, local % per
        out = np.empty((len(rows), stored_row(lay0.arrays[array], lay0.dtype)[-1]), DTYPES[lay0.dtype])
        group = seg * (1 + int(cidx.max(initial=0))) + cidx
        for g in np.unique(group):
            sel = np.nonzero(group == g)[0]
            shard = self._shard(int(seg[sel[0]]), int(cidx[sel[0]]), array)
            out[sel] = shard[off[sel], views[sel]] if views is not None else shard[off[sel]]
        return from_storage(out, lay0.dtype)

    def image_rows(self, keys: Sequence[str]) -> np.ndarray:
        rows = self.key_index.rows(keys)
        if (rows < 0).any():
            absent = int(np.count_nonzero(rows < 0))
            more = f"; {absent} of these {len(keys)} keys are not" if absent > 1 else ""
            raise CacheError(f"sample {keys[int(np.argmax(rows < 0))]!r} is not in the teacher cache {self.root} "
                             f"({self.n_samples} samples{more}); rebuild the cache over the training data")
        return rows

    def images(self, keys: Sequence[str], views: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Image targets of ``keys`` at ``views`` (default view 0)."""
        rows = self.image_rows(keys)
        v = np.zeros(len(rows), np.int64) if views is None else np.asarray(views, dtype=np.int64)
        if len(v) != len(rows):
            raise ValueError(f"{len(rows)} keys but {len(v)} views")
        n_views = self.info.views
        if len(v) and (v.min() < 0 or v.max() >= n_views):
            bad = int(v[(v < 0) | (v >= n_views)][0])
            raise CacheError(f"view {bad} is not in the teacher cache {self.root}, which holds views "
                             f"0..{n_views - 1}; rebuild it with --views {bad + 1} or draw fewer views")
        return {a: self._gather(a, rows, v) for a in self.layouts[0].arrays_of("image")}

    def texts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        if not captions:
            return {}
        rows = self.caption_index.rows(captions)
        if (rows < 0).any():
            raise CacheError(f"caption {captions[int(np.argmax(rows < 0))]!r} is not in the teacher cache "
                             f"{self.root}; rebuild the cache over the training data")
        return {a: self._gather(a, rows, None) for a in self.layouts[0].arrays_of("text")}

    def synthetic_texts(self, keys: Sequence[str], idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """The teacher's text targets of each key's drawn synthetic caption ``idx``: ``text_embeds`` (and
        ``text_features``)."""
        rows = self.image_rows(list(keys))
        sel = np.asarray(idx, dtype=np.int64)
        return {a.replace("syncap", "text"): self._gather(a, rows, sel) for a in self.layouts[0].arrays_of("syncap")}
