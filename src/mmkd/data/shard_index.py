"""The index of a shard spec: per shard its name, size and sample count, per sample its byte span in the tar.

Built once (one pass over every shard, fetched one at a time and evicted as the pass goes) and stored under
``cache_dir/shards/index-<hash>/``: ``index.json`` (O(shards): names, sizes, counts, samples left out) and
``spans.npy`` (two int64 per sample, memory-mapped, so a process touches only the pages of the samples it reads).
The pass validates every sample the way the eager reader did (an image member, the caption and label members
the set needs, parseable captions), so bad samples are reported or skipped once, here, naming shard and key.
A local shard whose size or modification time changed makes the index stale and it is rebuilt. The pass also
hashes each shard's bytes (SHA-256, ``digests``): a teacher cache records it, so a shard whose content changed
while its size stayed (tar pads to 10,240-byte records) is noticed, and a re-fetched remote shard is checked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mmkd.data.records import BadSamples, DataError, Record
from mmkd.data.shards import ShardRef, ShardStore, file_sha256
from mmkd.fileio import atomic_write, atomic_write_json

INDEX_VERSION = 2  # 2: per-shard SHA-256 digests
Validate = Callable[..., Record]  # (shard name, key, parts, captioned=, labelled=) -> Record


@dataclass
class ShardIndex:
    """Counts and spans of every valid sample; ``spans[offsets[s] + j]`` is sample j of shard s."""

    refs: list[ShardRef]
    counts: np.ndarray  # int64 [shards]
    spans: np.ndarray  # int64 [samples, 2], often a read-only memory map
    sizes: list[int]
    skipped: list[str] = field(default_factory=list)
    build_s: float = 0.0
    digests: list[str] = field(default_factory=list)  # SHA-256 of each shard's bytes, as indexed
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, sample within shard) of global sample ``i``."""
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return s, i - int(self.offsets[s])

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data without reading it: shard names, sizes and sample counts."""
        h = hashlib.sha256()
        for ref, size, count in zip(self.refs, self.sizes, self.counts.tolist()):
            h.update(f"{ref.name}\0{size}\0{count}\n".encode())
        return {"n": self.n, "shards": len(self.refs), "sha256": h.hexdigest()}


# ------------------------------------------------------------------------------------------------ scanning


def member_key(m: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member as webdataset groups them: ``dir/stem.ext`` → (``dir/stem``,
    ``ext``), the key ending at the first dot; None for folders, hidden files and names without an extension."""
    if not m.isfile():
        return None
    dirname, _, base = m.name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext


def tar_samples(path: Path, name: str, bad: BadSamples, with_bytes: bool = True
                ) -> Iterator[tuple[str, dict[str, bytes], int, int]]:
    """(key, {extension: bytes}, start, end) per sample, members of one sample being contiguous (webdataset's rule).

    ``start..end`` spans the sample's member headers and data, so reading it back is one seek and one read. A
    shard that ends without tar's end-of-archive marker was cut short (``tarfile`` reads a cut on a 512-byte
    boundary as a clean, shorter archive): its last sample is reported as possibly incomplete.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    start = end = 0
    problem = None
    try:
        with tarfile.open(path, "r:") as tf:
            last = None
            for m in tf:
                last = m
                named = member_key(m)
                if named is None:
                    continue
                k, ext = named
                if k != key:
                    if key is not None:
                        yield key, parts, start, end
                    key, parts, start = k, {}, m.offset
                f = tf.extractfile(m)
                parts[ext.lower()] = f.read() if f is not None else b""
                end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if last is not None and not _has_end_marker(tf, last):
                problem = (f"the shard ends without tar's end-of-archive marker after member {last.name!r}: it was "
                           "cut short (a partial download or copy)")
    except (tarfile.TarError, OSError, EOFError) as e:
        if key is None:
            raise DataError(f"{name}: cannot read tar shard ({e}); re-download or re-create it") from None
        problem = f"the shard is damaged after sample {key!r} ({e})"
    if key is None:
        return
    if problem is not None:  # the sample the cut fell in or after: its members may be incomplete
        bad.report(DataError(f"{name}:{key}: {problem}, so this sample may have lost members (extensions read: "
                             f"{', '.join(sorted(parts)) or 'none'}); re-download or re-create the shard"))
        return
    yield key, parts, start, end


def _has_end_marker(tf: tarfile.TarFile, last: tarfile.TarInfo) -> bool:
    """Whether a zero block (tar's end-of-archive marker) follows the last member's data."""
    assert tf.fileobj is not None
    tf.fileobj.seek(last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def read_span(data: bytes, name: str) -> tuple[str, dict[str, bytes]]:
    """The (key, parts) of one sample from the bytes of its span (``ShardStore.read``), parsed by ``tarfile``."""
    import io

    parts: dict[str, bytes] = {}
    key = ""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
            for m in tf:
                named = member_key(m)
                if named is None:
                    continue
                key, ext = named
                f = tf.extractfile(m)
                parts[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{name}: a sample's bytes do not parse as tar members ({e}); the shard changed since it "
                        "was indexed: delete the shard index under cache_dir/shards") from None
    return key, parts


# -------------------------------------------------------------------------------------------------- building


def build_index(refs: list[ShardRef], store: ShardStore, validate: Validate, bad: BadSamples,
                needs: tuple[str | None, str | None]) -> ShardIndex:
    """One pass over the shards (each fetched, scanned, evicted): spans of the valid samples, bad ones reported.

    needs: (caption extensions, label extension) that every sample needs once any sample has them; which samples
    lack them is only known at the end, so those samples' positions are kept (few) and removed then.
    """
    t0 = time.perf_counter()
    cap_exts, lab_ext = needs
    spans: list[np.ndarray] = []
    counts: list[int] = []
    sizes: list[int] = []
    digests: list[str] = []
    lacking: dict[str, list[tuple[int, int, str]]] = {"caption": [], "label": []}
    example: dict[str, str | None] = {"caption": None, "label": None}
    hashes: list[np.ndarray] = []  # 64-bit key hashes, 8 bytes a sample: duplicates are found at the end
    # a bar on a terminal (tqdm: none in a redirected log), and the time once done (see load_or_build)
    for s, ref in enumerate(tqdm(refs, desc="indexing shards", unit="shard", disable=None, leave=False)):
        path = store.local_path(s)
        sizes.append(path.stat().st_size)
        rows: list[tuple[int, int]] = []
        keys: list[int] = []
        for key, parts, start, end in tar_samples(path, ref.name, bad):
            try:
                validate(ref.name, key, parts)
            except DataError as e:
                bad.report(e)
                continue
            for what, exts in (("caption", cap_exts), ("label", lab_ext)):
                if exts is None:
                    continue
                if any(e in parts for e in exts.split(",")):
                    example[what] = example[what] or f"{ref.name}:{key}"
                else:
                    lacking[what].append((s, len(rows), key))
            rows.append((start, end))
            keys.append(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))
        digests.append(file_sha256(path))
        spans.append(np.asarray(rows, dtype=np.int64).reshape(-1, 2))
        hashes.append(np.asarray(keys, dtype=np.uint64))
        counts.append(len(rows))
    drop: dict[int, set[int]] = {}
    _duplicates(refs, store, spans, hashes, bad, drop)
    for what, found in lacking.items():
        if example[what] is None:
            continue
        for s, j, key in found:
            _, parts = read_span(store.read(s, *(int(v) for v in spans[s][j])), refs[s].name)
            try:  # the reader's own check, now that it knows a sample that has one
                validate(refs[s].name, key, parts, **{"captioned" if what == "caption" else "labelled": example[what]})
            except DataError as e:
                bad.report(e)
                drop.setdefault(s, set()).add(j)
    for s, js in drop.items():
        keep = np.ones(len(spans[s]), bool)
        keep[list(js)] = False
        spans[s] = spans[s][keep]
        counts[s] = len(spans[s])
    all_spans = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
    return ShardIndex(refs, np.asarray(counts, np.int64), all_spans, sizes, list(bad.skipped),
                      time.perf_counter() - t0, digests)


def _duplicates(refs: list[ShardRef], store: ShardStore, spans: list[np.ndarray], hashes: list[np.ndarray],
                bad: BadSamples, drop: dict[int, set[int]]) -> None:
    """Report every sample whose key an earlier sample has (keys must be unique: the teacher cache and resume
    look samples up by key) and mark it to be dropped; found by sorting the hashes, not by a dict of every key."""
    flat = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    later = np.nonzero(ordered[1:] == ordered[:-1])[0] + 1
    if not len(later):
        return
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hashes])])
    for i in later:
        g = int(order[i])
        f = int(order[np.searchsorted(ordered, ordered[i], side="left")])  # stable sort: the earliest sample
        s = int(np.searchsorted(offsets, g, side="right") - 1)
        j = g - int(offsets[s])
        fs = int(np.searchsorted(offsets, f, side="right") - 1)
        fj = f - int(offsets[fs])
        key = read_span(store.read(s, *(int(v) for v in spans[s][j])), refs[s].name)[0]
        other = read_span(store.read(fs, *(int(v) for v in spans[fs][fj])), refs[fs].name)[0]
        if key != other:
            continue  # a 64-bit hash collision of two different keys
        bad.report(DataError(f"{refs[s].name}:{key}: duplicate sample key (also in {refs[fs].name}:{other}); "
                             "keys must be unique: remove or rename one"))
        drop.setdefault(s, set()).add(j)


def _stamp(ref: ShardRef) -> list[int] | None:
    if ref.path is None:
        return None
    st = ref.path.stat()
    return [st.st_size, st.st_mtime_ns]


def load_or_build(refs: list[ShardRef], store: ShardStore, folder: Path | None, validate: Validate,
                  bad: BadSamples, needs: tuple[str | None, str | None], identity: dict[str, Any]) -> ShardIndex:
    """The stored index when it is current, else a fresh one (written to ``folder``; None: kept in memory only).

    One process builds while the others wait on a lock (torchrun ranks, concurrent runs). Samples the stored
    index left out are reported again, so ``data.on_error`` counts them in every run (and ``raise`` stops)."""
    if folder is None:
        return build_index(refs, store, validate, bad, needs)
    folder.mkdir(parents=True, exist_ok=True)
    stamps = [_stamp(r) for r in refs]
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = _read_meta(folder / "index.json")
        if (meta is not None and meta.get("version") == INDEX_VERSION and meta.get("identity") == identity
                and meta.get("stamps") == stamps and isinstance(meta.get("digests"), list)
                and (folder / "spans.npy").is_file()):
            spans = np.load(folder / "spans.npy", mmap_mode="r", allow_pickle=False)
            index = ShardIndex(refs, np.asarray(meta["counts"], np.int64), spans, list(meta["sizes"]),
                               list(meta["skipped"]), float(meta["build_s"]), list(meta["digests"]))
            if index.n == len(spans):
                for msg in index.skipped:
                    bad.report(DataError(msg))
                return index
        fresh = BadSamples(bad.policy)
        print(f"mmkd: indexing {len(refs)} shard(s) ({refs[0].name}{', …' if len(refs) > 1 else ''}): each is read "
              "once", file=sys.stderr)
        index = build_index(refs, store, validate, fresh, needs)
        print(f"mmkd: indexed {index.n:,} samples in {len(refs)} shard(s) in {index.build_s:.1f} s (once: the index "
              f"is kept in {folder})", file=sys.stderr)
        atomic_write(folder / "spans.npy", lambda f: np.save(f, index.spans, allow_pickle=False))
        atomic_write_json(folder / "index.json", {
            "version": INDEX_VERSION, "identity": identity, "stamps": stamps, "counts": index.counts.tolist(),
            "sizes": index.sizes, "digests": index.digests, "skipped": index.skipped,
            "build_s": round(index.build_s, 3),
            "shards": [r.name for r in refs]})
        bad.skipped.extend(fresh.skipped)
        index.spans = np.load(folder / "spans.npy", mmap_mode="r", allow_pickle=False)
        return index


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or torn: rebuild
    return meta if isinstance(meta, dict) else None
