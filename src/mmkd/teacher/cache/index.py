"""Row lookup by sample key (or caption) without a Python dict of every key.

Why: a dict of a million keys costs ~100 MB and seconds to build in every process that opens the cache, and each
DataLoader worker would build its own. Instead each manifest generation G has, for keys and for captions, every
string's 64-bit hash sorted (``G.WHAT.hash.npy``), the global row of each (``G.WHAT.row.npy``) and the strings
themselves in the same order (``G.WHAT.offsets.npy`` + ``G.WHAT.bytes.npy``). A reader memory-maps the four
files, finds a string with ``np.searchsorted`` and compares the stored bytes, so a hash collision costs one more
comparison and never a wrong row. Opening reads no key; memory grows with the pages lookups touch (shared between
processes by the page cache), and a reader holds four maps whatever the number of segments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmkd.teacher.cache import format as fmt
from mmkd.teacher.cache.format import CacheError, load_npy, write_npy

PARTS = ("hash", "row", "offsets", "bytes")
GATHER_BLOCK = 1 << 20  # strings copied per step when writing an index: bounds the temporary index arrays


def index_paths(root: Path, generation: str, what: str) -> dict[str, Path]:
    return {part: root / fmt.INDEX / f"{generation}.{what}.{part}.npy" for part in PARTS}


class KeyIndex:
    """Global row of each string (a sample key or a caption) in one index generation.

    Maps are opened on first use in each process (a pickled or forked copy opens its own), so an instance is
    safe to hand to DataLoader workers.
    """

    def __init__(self, root: Path, generation: str, what: str) -> None:
        self.root, self.generation, self.what = root, generation, what
        self._pid = -1
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=-1, _maps={})  # maps are per process: the copy opens its own
        return state

    def maps(self) -> dict[str, np.ndarray]:
        if self._pid != os.getpid() or not self._maps:
            paths = index_paths(self.root, self.generation, self.what)
            if not paths["hash"].is_file():
                raise CacheError(f"{paths['hash']} is missing: the teacher cache {self.root} was grown while this "
                                 "process read it (or is damaged); restart to read its new manifest")
            self._maps = {part: load_npy(p) for part, p in paths.items()}
            self._pid = os.getpid()
        return self._maps

    def __len__(self) -> int:
        return len(self.maps()["hash"])

    def rows(self, strings: Sequence[str]) -> np.ndarray:
        """Global row of each string, -1 where the index does not hold it."""
        m = self.maps()
        hashes, rows, offsets, data = m["hash"], m["row"], m["offsets"], m["bytes"]
        out = np.full(len(strings), -1, np.int64)
        if not len(strings) or not len(hashes):
            return out
        want = fmt.key_hashes(strings)
        pos = np.searchsorted(hashes, want)
        hit = np.nonzero((pos < len(hashes)) & (hashes[np.minimum(pos, len(hashes) - 1)] == want))[0]
        p = pos[hit]
        encoded = [strings[i].encode() for i in hit.tolist()]
        lo = np.asarray(offsets[p], np.int64)
        lengths = np.asarray(offsets[p + 1], np.int64) - lo
        same = lengths == np.fromiter(map(len, encoded), np.int64, count=len(encoded))
        # compare the stored bytes of every candidate whose length matches, all at once
        starts = np.concatenate([[0], np.cumsum(lengths[same])]).astype(np.int64)
        total = int(starts[-1])
        stored = np.asarray(data[np.arange(total) + np.repeat(lo[same] - starts[:-1], lengths[same])])
        wanted = np.frombuffer(b"".join(e for e, ok in zip(encoded, same.tolist()) if ok), np.uint8)
        equal = np.ones(int(same.sum()), bool)
        nonempty = lengths[same] > 0
        if total:
            equal[nonempty] = np.logical_and.reduceat(stored == wanted, starts[:-1][nonempty])
        match = np.zeros(len(hit), bool)
        match[same] = equal
        out[hit[match]] = np.asarray(rows[p[match]], np.int64)
        for j in np.nonzero(~match)[0].tolist():  # a collision with another string: look at every entry of its hash
            i, at, s = int(hit[j]), int(p[j]) + 1, encoded[j]
            while at < len(hashes) and hashes[at] == want[i]:
                if data[int(offsets[at]):int(offsets[at + 1])].tobytes() == s:
                    out[i] = int(rows[at])
                    break
                at += 1
        return out


def write_index(root: Path, generation: str, what: str, folders: Sequence[Path], shards: Sequence[str],
                unique: bool) -> None:
    """Merge the segments' string tables and hashes into generation ``generation``'s sorted index.

    A stable sort keeps equal strings in row order, so a caption cached by two segments is found at its first row.
    ``unique``: two segments holding one sample key is refused, naming both shards (a key must have one row).
    Memory: the strings' bytes twice and the hashes and offsets of every string (a build-time cost).
    """
    tables = [fmt.StringTable(f, what) for f in folders]
    counts = np.array([len(t) for t in tables], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    hashes = (np.concatenate([np.asarray(load_npy(f / f"{what}.hash.npy")) for f in folders]) if folders
              else np.zeros(0, "<u8"))
    data = np.concatenate([np.asarray(t.data) for t in tables]) if tables else np.zeros(0, np.uint8)
    offsets = (np.concatenate([[0]] + [np.asarray(t.offsets[1:], np.int64) + int(base) for t, base in
                                        zip(tables, np.cumsum([0] + [len(t.data) for t in tables]))])
               if tables else np.zeros(1, np.int64)).astype(np.int64)
    order = np.argsort(hashes, kind="stable")
    lengths = np.diff(offsets)[order]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<u8")
    new_data = np.empty(int(new_offsets[-1]), np.uint8)
    for b in range(0, len(order), GATHER_BLOCK):  # new_data[new_off[p]:...] = data[off[order[p]]:...], vectorised
        sel = slice(b, b + GATHER_BLOCK)
        n = lengths[sel]
        lo, total = int(new_offsets[b]), int(n.sum())
        shift = np.repeat(offsets[order[sel]] - new_offsets[:-1][sel].astype(np.int64), n)
        new_data[lo:lo + total] = data[np.arange(lo, lo + total) + shift]
    sorted_hashes = hashes[order]
    if unique:
        for p in np.nonzero(sorted_hashes[1:] == sorted_hashes[:-1])[0]:
            a = new_data[int(new_offsets[p]):int(new_offsets[p + 1])].tobytes()
            if a == new_data[int(new_offsets[p + 1]):int(new_offsets[p + 2])].tobytes():
                sa, sb = (int(np.searchsorted(starts, int(order[q]), side="right")) - 1 for q in (p, p + 1))
                named = [f"{folders[i].name} (shard {shards[i] or 'in memory'})" for i in (sa, sb)]
                raise CacheError(f"sample key {a.decode()!r} is in two segments of {root}: {named[0]} and {named[1]}; "
                                 "keys must be unique across the cache. If shards were moved or renamed, build into a "
                                 "new --out (or delete the stale segment's folder)")
    paths = index_paths(root, generation, what)
    write_npy(paths["bytes"], new_data)
    write_npy(paths["offsets"], new_offsets)
    write_npy(paths["row"], order.astype("<i8"))
    write_npy(paths["hash"], sorted_hashes.astype("<u8"))
