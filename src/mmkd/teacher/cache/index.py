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
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mmkd.fileio import disk_full_error, fsync_dir, is_disk_full
from mmkd.teacher.cache import format as fmt
from mmkd.teacher.cache.format import CacheError, load_npy

PARTS = ("hash", "row", "offsets", "bytes")
GATHER_BYTES = 1 << 16  # string bytes copied per vectorised step when writing an index (8-byte index arrays each)
MERGE_BLOCK = 1 << 14  # entries merged per round when writing an index, over all segments


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


class _NpyOut:
    """A 1-D ``.npy`` file of known length written block by block into a temporary file beside it (``.NAME.tmp-*``,
    swept by the folder's owner if the writer is killed) and renamed into place by ``commit``."""

    def __init__(self, path: Path, dtype: str, n: int) -> None:
        self.path = path
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        self.f = os.fdopen(fd, "wb")
        header = np.lib.format.header_data_from_array_1_0(np.empty(0, dtype))
        np.lib.format.write_array_header_1_0(self.f, {**header, "shape": (int(n),)})

    def write(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr).tobytes())

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:  # its buffer could not be flushed (a full disk): the file goes anyway
            pass
        Path(self.tmp).unlink(missing_ok=True)


class _NpyIn:
    """Slices of a 1-D ``.npy`` file read into fresh buffers (not mapped: the pages read leave with the buffers,
    so a pass over every segment holds one block at a time)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")
        version = np.lib.format.read_magic(self.f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(self.f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(self.f))
        self.n, self.dtype, self.base = int(np.prod(shape)), dtype, self.f.tell()

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.f.seek(self.base + lo * self.dtype.itemsize)
        return np.frombuffer(self.f.read((hi - lo) * self.dtype.itemsize), self.dtype)

    def close(self) -> None:
        self.f.close()


def write_index(root: Path, generation: str, what: str, folders: Sequence[Path], shards: Sequence[str],
                unique: bool) -> None:
    """Merge the segments' string tables and hashes into generation ``generation``'s sorted index.

    Equal hashes keep row order (as a stable sort of every hash would), so a caption cached by two segments is
    found at its first row. ``unique``: two segments holding one sample key is refused, naming both shards (a key
    must have one row). Memory does not grow with the cache: each segment is sorted alone into a scratch file (its
    hashes, global rows and strings in hash order), then the segments are merged block by block, each round taking
    about ``MERGE_BLOCK`` entries in all, and the four index files are written as the merge goes.
    """
    index_dir = root / fmt.INDEX
    index_dir.mkdir(parents=True, exist_ok=True)
    counts, total = [], 0
    for f in folders:  # entries and string bytes of each segment, from its offsets' length and last value
        offsets = _NpyIn(f / f"{what}.offsets.npy")
        counts.append(offsets.n - 1)
        total += int(offsets.read(offsets.n - 1, offsets.n)[0]) if offsets.n else 0
        offsets.close()
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(starts[-1])
    scratch = [_NpyOut(index_dir / f".{generation}.{what}.{part}.tmp-scratch", dt, size) for part, dt, size in
               (("hash", "<u8", n), ("row", "<i8", n), ("offsets", "<u8", n + 1), ("bytes", "|u1", total))]
    outputs: list[_NpyOut] = []
    readers: list[_NpyIn] = []
    try:
        _sort_segments(folders, what, starts, scratch)
        for out in scratch:
            out.commit()
        readers = [_NpyIn(out.path) for out in scratch]
        paths = index_paths(root, generation, what)
        outputs = [_NpyOut(paths["hash"], "<u8", n), _NpyOut(paths["row"], "<i8", n),
                   _NpyOut(paths["offsets"], "<u8", n + 1), _NpyOut(paths["bytes"], "|u1", total)]
        _merge(readers, starts, outputs, lambda a, b, text: _clash(root, folders, shards, starts, a, b, text)
               if unique else None)
        for out in outputs:
            out.commit()
        fsync_dir(index_dir)
    except BaseException as e:
        full = not isinstance(e, KeyboardInterrupt) and is_disk_full(e, index_dir)
        for out in (*scratch, *outputs):
            out.abort()
        if full:
            raise disk_full_error(index_dir / f"{generation}.{what}.*.npy", "the previous index is untouched") from None
        raise
    finally:
        for r in readers:
            r.close()
        for out in scratch:
            out.path.unlink(missing_ok=True)


def _sort_segments(folders: Sequence[Path], what: str, starts: np.ndarray, scratch: list[_NpyOut]) -> None:
    """Each segment's (hash, global row, string) sorted by hash (stable), appended to the scratch files (hash, row,
    offsets over all segments, bytes). One segment in memory at a time."""
    s_hash, s_row, s_off, s_bytes = scratch
    base = 0
    s_off.write(np.zeros(1, "<u8"))
    for j, folder in enumerate(folders):
        table = fmt.StringTable(folder, what)
        hashes = np.asarray(load_npy(folder / f"{what}.hash.npy"))
        order = np.argsort(hashes, kind="stable")
        offsets = np.asarray(table.offsets, np.int64)
        lengths = np.diff(offsets)[order]
        ends = np.cumsum(lengths).astype(np.int64)
        s_hash.write(hashes[order].astype("<u8"))
        s_row.write((order + starts[j]).astype("<i8"))
        s_off.write((ends + base).astype("<u8"))
        s_bytes.write(_gather(np.asarray(table.data), offsets[order], lengths))
        base += int(ends[-1]) if len(ends) else 0
        del table, hashes


def _gather(data: np.ndarray, lo: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The strings ``data[lo[i]:lo[i] + lengths[i]]`` concatenated, in bounded steps (index arrays are 8 bytes a
    byte of text: never made for more than ``GATHER_BYTES`` bytes at once)."""
    out = np.empty(int(lengths.sum()), np.uint8)
    ends = np.cumsum(lengths)
    i = at = 0
    while i < len(lengths):
        j = max(i + 1, int(np.searchsorted(ends, (ends[i - 1] if i else 0) + GATHER_BYTES, side="right")))
        n = lengths[i:j]
        total = int(n.sum())
        shift = np.repeat(lo[i:j] - (at + np.concatenate([[0], np.cumsum(n)[:-1]])), n)
        out[at:at + total] = data[np.arange(at, at + total) + shift]
        at += total
        i = j
    return out


def _merge(readers: list[_NpyIn], starts: np.ndarray, outputs: list[_NpyOut],
           clash: Callable[[int, int, bytes], None] | None) -> None:
    """K-way merge of the sorted segments in the scratch files (hash, row, offsets, bytes) into the outputs (hash,
    row, offsets, bytes): each round reads a block of every segment not yet done, takes the entries up to the
    smallest last hash among blocks that do not end their segment (so nothing smaller can come later), and orders
    them by (hash, global row) — the order of a stable sort of every hash."""
    r_hash, r_row, r_off, r_bytes = readers
    k = len(starts) - 1
    cursor = starts[:-1].copy()
    block = max(16, MERGE_BLOCK // max(1, k))
    written = 0
    last: tuple[int, int, bytes] | None = None  # the previous round's last entry: a duplicate may straddle rounds
    outputs[2].write(np.zeros(1, "<u8"))
    while True:
        live = [j for j in range(k) if cursor[j] < starts[j + 1]]
        if not live:
            return
        blocks = {j: r_hash.read(int(cursor[j]), int(min(cursor[j] + block, starts[j + 1]))) for j in live}
        bounded = [int(blocks[j][-1]) for j in live if cursor[j] + len(blocks[j]) < starts[j + 1]]
        limit = min(bounded) if bounded else None
        # entries below the limit: every later one is ≥ it. Entries equal to it are taken all at once, from every
        # segment, only when nothing is below it (ties are rare: 64-bit hashes), so they keep row order
        takes = {j: len(blocks[j]) if limit is None else int(np.searchsorted(blocks[j], np.uint64(limit), "left"))
                 for j in live}
        if limit is not None and not any(takes.values()):
            takes = {j: _run_of(r_hash, int(cursor[j]), int(starts[j + 1]), limit, block) for j in live}
        hashes, rows, lengths, chunks = [], [], [], []
        for j in live:
            take = takes[j]
            if not take:
                continue
            blocks[j] = r_hash.read(int(cursor[j]), int(cursor[j]) + take) if take > len(blocks[j]) else blocks[j]
            lo, hi = int(cursor[j]), int(cursor[j]) + take
            off = r_off.read(lo, hi + 1).astype(np.int64)
            hashes.append(blocks[j][:take])
            rows.append(r_row.read(lo, hi))
            lengths.append(np.diff(off))
            chunks.append(r_bytes.read(int(off[0]), int(off[-1])))
            cursor[j] = hi
        h, row, length = np.concatenate(hashes), np.concatenate(rows), np.concatenate(lengths)
        data = np.concatenate(chunks)
        order = np.lexsort((row, h))
        src_lo = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        merged = _gather(data, src_lo[order], length[order])
        h, row, length = h[order], row[order], length[order]
        new_off = np.cumsum(length).astype(np.int64)
        if clash is not None:
            _check_unique(h, row, merged, new_off, last, clash)
            last = (int(h[-1]), int(row[-1]), merged[int(new_off[-2]) if len(new_off) > 1 else 0:].tobytes())
        outputs[0].write(h.astype("<u8"))
        outputs[1].write(row.astype("<i8"))
        outputs[2].write((new_off + written).astype("<u8"))
        outputs[3].write(merged)
        written += int(new_off[-1])


def _run_of(r_hash: _NpyIn, lo: int, hi: int, value: int, block: int) -> int:
    """How many entries from ``lo`` (before ``hi``) equal ``value`` (a sorted segment's run of one hash)."""
    n = 0
    while lo + n < hi:
        blk = r_hash.read(lo + n, min(lo + n + block, hi))
        eq = int(np.searchsorted(blk, np.uint64(value), "right"))
        n += eq
        if eq < len(blk):
            break
    return n


def _check_unique(h: np.ndarray, row: np.ndarray, data: np.ndarray, ends: np.ndarray,
                  last: tuple[int, int, bytes] | None, clash: Callable[[int, int, bytes], None]) -> None:
    """Call ``clash(row a, row b, string)`` for the first two equal strings in a merged block (hash-sorted)."""
    begins = np.concatenate([[0], ends[:-1]])
    if last is not None and int(h[0]) == last[0] and data[:int(ends[0])].tobytes() == last[2]:
        clash(last[1], int(row[0]), last[2])
    for p in np.nonzero(h[1:] == h[:-1])[0].tolist():
        a = data[int(begins[p]):int(ends[p])].tobytes()
        if a == data[int(begins[p + 1]):int(ends[p + 1])].tobytes():
            clash(int(row[p]), int(row[p + 1]), a)


def _clash(root: Path, folders: Sequence[Path], shards: Sequence[str], starts: np.ndarray, a: int, b: int,
           text: bytes) -> None:
    sa, sb = (int(np.searchsorted(starts, r, side="right")) - 1 for r in (a, b))
    named = [f"{folders[i].name} (shard {shards[i] or 'in memory'})" for i in (sa, sb)]
    raise CacheError(f"sample key {text.decode()!r} is in two segments of {root}: {named[0]} and {named[1]}; "
                     "keys must be unique across the cache. If shards were moved or renamed, build into a "
                     "new --out (or delete the stale segment's folder)")
