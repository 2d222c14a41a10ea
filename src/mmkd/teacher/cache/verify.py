"""Verifying a teacher cache completely (``mmkd cache --verify``): metadata, index, every chunk's marker and
shards, checksums, finite values and unit norms. Reads only; changes nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache.format import (
    INDEX_NAMES,
    LOCK_NAME,
    NORM_TOLERANCE,
    CacheError,
    Layout,
    array_sha256,
    from_storage,
    read_json,
    read_meta,
)


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
    """Check a cache folder completely: metadata, index, every chunk's marker and shards, and (``deep``) each
    shard's SHA-256 against its marker, finite values and unit-norm embeddings. Reads only; changes nothing."""
    root = Path(path)
    rep = VerifyReport(root)
    try:
        meta = read_meta(root)
        index = read_json(root / "keys.json", "the sample index is missing")
        captions = read_json(root / "captions.json", "the caption index is missing")
        layout = Layout.from_meta(root, meta)
    except CacheError as e:
        rep.problems.append(str(e))
        return rep
    f = meta["fingerprint"]
    if not isinstance(index, dict) or not isinstance(captions, list):
        rep.problems.append(f"{root / 'keys.json'} or {root / 'captions.json'} does not hold what the cache writes "
                            "(damaged): rebuild the cache")
        return rep
    keys, digests = index.get("keys", []), index.get("digests", [])
    if len(keys) != layout.n_samples or len(digests) != len(keys):
        rep.problems.append(f"keys.json holds {len(keys)} keys / {len(digests)} digests, meta.json says "
                            f"{layout.n_samples} samples")
    elif len(set(keys)) != len(keys):
        rep.problems.append("keys.json lists a sample key twice")
    elif fp.data_sha256(keys, digests) != f["data"]["sha256"]:
        rep.problems.append("keys.json does not match the data fingerprint in meta.json")
    if len(captions) != layout.n_captions or captions != sorted(set(captions)):
        rep.problems.append("captions.json is not the sorted, duplicate-free caption list meta.json describes")
    elif fp.captions_sha256(captions) != f["data"]["captions_sha256"]:
        rep.problems.append("captions.json does not match the caption fingerprint in meta.json")
    expected_files = {*INDEX_NAMES, LOCK_NAME}
    stray = sorted(p.name for p in root.iterdir() if p.name not in expected_files)
    if stray:
        rep.notes.append(f"files that are not part of the cache: {stray[:5]}")
    known: set[str] = set()
    incomplete = 0
    tol = NORM_TOLERANCE[layout.dtype]
    for c in layout.chunks():
        marker = layout.marker(c)
        known.add(marker.name)
        names = layout.arrays_of(c.kind)
        known.update(layout.shard(c, a).name for a in names)
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
        for a in names:
            try:
                layout.check_shard(c, a)
            except CacheError as e:
                rep.problems.append(str(e))
                continue
            if not deep:
                continue
            arr = np.load(layout.shard(c, a), mmap_mode="r")
            if array_sha256(arr) != m["files"][a]["sha256"]:
                rep.problems.append(f"shard {layout.shard(c, a)}: contents differ from the checksum in {marker} "
                                    f"(corrupted); delete {marker} and rerun `mmkd cache` to recompute the chunk")
                continue
            x = from_storage(np.array(arr), layout.dtype)
            if not torch.isfinite(x).all():
                rep.problems.append(f"shard {layout.shard(c, a)} holds NaN or infinite values")
            elif a.endswith("_embeds") and x.numel():
                dev = float((x.norm(dim=-1) - 1).abs().max())
                if dev > tol:
                    rep.problems.append(f"shard {layout.shard(c, a)}: embeddings are not unit-norm (max deviation "
                                        f"{dev:.3g} > {tol:g})")
    if incomplete:
        rep.problems.append(f"{incomplete} of {len(layout.chunks())} chunks are not written (an interrupted build): "
                            "rerun the same `mmkd cache` command to finish it")
    leftovers = sorted(p.name for p in (root / "shards").iterdir() if p.name not in known) \
        if (root / "shards").is_dir() else []
    if leftovers:
        rep.notes.append(f"{len(leftovers)} uncommitted file(s) in shards/ (left by an interrupted build; the next "
                         f"build overwrites or removes them): {leftovers[:3]}")
    t = f["teacher"]
    rep.summary = (f"{layout.n_samples} samples × {f['views']} view(s), {layout.n_captions} captions, arrays "
                   f"{', '.join(layout.arrays)}, {layout.dtype}; teacher {t.get('source') or '(in-process)'} "
                   f"weights {t['weights_sha256'][:12]}, embedding width {t['projection_dim']}")
    return rep
