"""Verifying a teacher cache completely (``mmkd cache --verify``): metadata, index, every chunk's marker and
shards, checksums, finite values and unit norms. Reads only; changes nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache import format as fmt
from mmkd.teacher.cache import synthetic
from mmkd.teacher.cache.format import (
    DONE_FILE,
    INDEX_NAMES,
    LOCK_NAME,
    NORM_TOLERANCE,
    SEGMENT_FILE,
    SEGMENTS,
    SHARD_STAMP,
    CacheError,
    Chunk,
    Layout,
    StringTable,
    array_sha256,
    from_storage,
    load_npy,
    read_json,
    read_manifest,
)
from mmkd.teacher.cache.index import KeyIndex
from mmkd.teacher.cache.info import CacheInfo
from mmkd.teacher.cache.size import cache_size


@dataclass
class VerifyReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(path: str | os.PathLike, deep: bool = True) -> VerifyReport:
    """Check a cache folder completely: metadata, manifest and key index, every segment's tables, every chunk's
    marker and arrays, and (``deep``) each array's SHA-256 against its marker, finite values and unit-norm
    embeddings. Segments not (yet) in the manifest are an interrupted build's. Reads only; changes nothing."""
    root = Path(path)
    rep = VerifyReport(root)
    try:
        cache = CacheInfo.read(root)
        manifest = read_manifest(root)
    except CacheError as e:
        rep.problems.append(str(e))
        return rep
    listed = [s["name"] for s in manifest["segments"]] if manifest else []
    on_disk = sorted(p.name for p in (root / SEGMENTS).iterdir() if p.is_dir()) if (root / SEGMENTS).is_dir() else []
    unlisted = [n for n in on_disk if n not in listed]
    if not listed:
        rep.problems.append(f"{root} holds no finished segment (an interrupted first build): rerun the same "
                            "`mmkd cache` command to finish it")
    if unlisted:
        rep.problems.append(f"{len(unlisted)} segment(s) are not written completely or not yet in manifest.json (an "
                            f"interrupted build), e.g. {unlisted[0]}: rerun the same `mmkd cache` command to finish "
                            "them")
    stray = sorted(p.name for p in root.iterdir() if p.name not in {*INDEX_NAMES, LOCK_NAME})
    if stray:
        rep.notes.append(f"files that are not part of the cache: {stray[:5]}")
    rows = 0
    for seg in manifest["segments"] if manifest else []:
        rows += _verify_segment(rep, cache, seg, deep)
    if manifest and listed:
        _verify_index(rep, root, manifest)
    t = cache.teacher
    n_captions = manifest["n_captions"] if manifest else 0
    rep.summary = (f"{rows} samples in {len(listed)} segment(s) × {cache.views} view(s), {n_captions} captions, "
                   f"arrays {', '.join(cache.arrays)}, {cache.dtype}; teacher {t.source or '(in-process)'} "
                   f"weights {t.weights_sha256[:12]}, embedding width {t.projection_dim}")
    if rows:
        try:
            rep.summary += f"; {cache_size(root).line()}"
        except (CacheError, OSError) as e:  # a damaged file is already a problem above; the size is left out
            rep.notes.append(f"bytes per sample not computed: {e}")
    return rep


def _verify_segment(rep: VerifyReport, cache: CacheInfo, seg: dict, deep: bool) -> int:
    """One listed segment: its commit, tables and fingerprint, then every chunk. Returns its sample count."""
    folder = cache.root / SEGMENTS / seg["name"]
    try:
        info = read_json(folder / SEGMENT_FILE, "the segment's index is missing: delete the folder and rerun")
        if not (folder / DONE_FILE).is_file():
            raise CacheError(f"{folder / DONE_FILE} is missing although manifest.json lists the segment: rerun the "
                             "same `mmkd cache` command")
        keys, digests, captions = (StringTable(folder, n).all() for n in ("keys", "digests", "captions"))
        key_hash, caption_hash = (np.asarray(load_npy(folder / f"{n}.hash.npy")) for n in ("keys", "captions"))
    except (CacheError, UnicodeDecodeError) as e:
        rep.problems.append(f"segment {folder}: {e}")
        return 0
    data = info.get("data", {}) if isinstance(info, dict) else {}
    if len(keys) != seg["n_samples"] or len(digests) != len(keys) or len(captions) != seg["n_captions"]:
        rep.problems.append(f"segment {folder}: its tables hold {len(keys)} keys / {len(digests)} digests / "
                            f"{len(captions)} captions, manifest.json says {seg['n_samples']} / {seg['n_captions']}")
        return 0
    if len(set(keys)) != len(keys):
        rep.problems.append(f"segment {folder}: a sample key is listed twice")
    elif fp.data_sha256(keys, digests) != data.get("sha256") or data.get("sha256") != seg.get("data_sha256"):
        rep.problems.append(f"segment {folder}: its keys and digests do not match its data fingerprint")
    if captions != sorted(set(captions)) or fp.captions_sha256(captions) != data.get("captions_sha256"):
        rep.problems.append(f"segment {folder}: its captions are not the sorted, duplicate-free list its "
                            "fingerprint describes")
    if not np.array_equal(key_hash, fmt.key_hashes(keys)) or not np.array_equal(caption_hash,
                                                                                fmt.key_hashes(captions)):
        rep.problems.append(f"segment {folder}: keys.hash.npy or captions.hash.npy does not match its strings")
    layout = Layout(folder, len(keys), len(captions), cache.chunk_rows, dict(cache.arrays), cache.dtype)
    known = {SEGMENT_FILE, DONE_FILE, SHARD_STAMP} | {f"{n}.{part}.npy" for n in ("keys", "digests", "captions")
                                         for part in ("bytes", "offsets")} | {"keys.hash.npy", "captions.hash.npy"}
    incomplete = 0
    for c in layout.chunks():
        marker = layout.marker(c)
        known.add(marker.name)
        names = layout.arrays_of(c.kind)
        known.update(layout.shard(c, a).name for a in names)
        if c.kind == "syncap":
            known.update(synthetic.string_files(c))
        if not marker.is_file():
            incomplete += 1
            continue
        try:
            m = read_json(marker, "")
        except CacheError as e:
            rep.problems.append(str(e))
            continue
        if m.get("rows") != [c.lo, c.hi] or sorted(m.get("files", {})) != sorted(names):
            rep.problems.append(f"{marker}: describes rows {m.get('rows')} / arrays {sorted(m.get('files', {}))}, "
                                f"expected rows {[c.lo, c.hi]} / arrays {sorted(names)}")
            continue
        problem = synthetic.check_strings(layout, c, m, deep) if c.kind == "syncap" else None
        if problem:
            rep.problems.append(problem)
        for a in names:
            problem = _verify_array(layout, c, a, m["files"][a], deep)
            if problem:
                rep.problems.append(problem)
    if incomplete:
        rep.problems.append(f"segment {folder.name}: {incomplete} of {len(layout.chunks())} chunks are not written "
                            "(an interrupted build): rerun the same `mmkd cache` command to finish it")
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in known)
    if leftovers:
        rep.notes.append(f"{len(leftovers)} uncommitted file(s) in {folder} (left by an interrupted build; the next "
                         f"build overwrites or removes them): {leftovers[:3]}")
    return len(keys)


def _verify_array(layout: Layout, c: Chunk, a: str, committed: dict, deep: bool) -> str | None:
    """One committed array: its header and size, and (``deep``) its checksum (``committed``: its marker's entry),
    finite values and unit norms. The problem in words, or None."""
    try:
        layout.check_shard(c, a)
    except CacheError as e:
        return str(e)
    if not deep:
        return None
    path, marker = layout.shard(c, a), layout.marker(c)
    arr = np.load(path, mmap_mode="r")
    if array_sha256(arr) != committed["sha256"]:
        return (f"shard {path}: contents differ from the checksum in {marker} (corrupted); delete {marker} and "
                "rerun `mmkd cache` to recompute the chunk")
    x = from_storage(np.array(arr), layout.dtype)
    if not torch.isfinite(x).all():
        return f"shard {path} holds NaN or infinite values"
    tol = NORM_TOLERANCE[layout.dtype]
    if a.endswith("_embeds") and x.numel():
        dev = float((x.norm(dim=-1) - 1).abs().max())
        if dev > tol:
            return f"shard {path}: embeddings are not unit-norm (max deviation {dev:.3g} > {tol:g})"
    return None


def _verify_index(rep: VerifyReport, root: Path, manifest: dict) -> None:
    """The key and caption index of the manifest's generation: sorted, complete, each entry its row's hash and
    string (checked by looking every string up)."""
    folders = [root / SEGMENTS / s["name"] for s in manifest["segments"]]
    for what in ("keys", "captions"):
        index = KeyIndex(root, manifest["index"], what)
        try:
            hashes = np.asarray(index.maps()["hash"])
            strings = [x for f in folders for x in StringTable(f, what).all()]
            rows = index.rows(strings)
        except CacheError as e:
            rep.problems.append(str(e))
            continue
        first = {}
        for i, x in enumerate(strings):  # a caption cached by two segments is found at its first row
            first.setdefault(x, i)
        expected = np.array([first[x] for x in strings], np.int64)
        if len(hashes) != len(strings) or not np.all(hashes[1:] >= hashes[:-1]) or not np.array_equal(rows, expected):
            rep.problems.append(f"{root / fmt.INDEX}: the {what} index of generation {manifest['index']} does not "
                                "match the segments (damaged): rerun the same `mmkd cache` command to rewrite it")
