"""Synthetic captions in a teacher cache (``mmkd cache --captioner MODEL --synthetic-captions N``): N captions per
sample sampled from an image-to-text model on the unaugmented image, stored as a string table per chunk beside
the teacher's text embeddings of them ([rows, N, D]), committed chunk by chunk like every other array; and
training's side: each step draws one of a sample's N captions, a pure function of (seed, key, step)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmkd.data.records import Record, open_encoded
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher.cache.format import (
    DTYPES,
    CacheError,
    Chunk,
    Layout,
    StringTable,
    array_sha256,
    commit_chunk,
    stored_row,
    strings_name,
    to_storage,
    write_strings,
)
from mmkd.teacher.cache.info import CacheInfo
from mmkd.teacher.captioner import Captioner, Sampling, chunk_seed
from mmkd.teacher.targets import teacher_outputs
from mmkd.teacher_spec import cache_value


def fingerprint(captioner: Captioner | CachedCaptions, sampling: Sampling, seed: int) -> dict[str, Any]:
    """meta.json's ``fingerprint.captioner``: what the stored captions depend on."""
    return {**captioner.identity(), "sampling": sampling.to_json(), "seed": int(seed)}


def raw_image(record: Record) -> Image.Image | np.ndarray:
    """A record's whole image, undecoded by any view: what the captioner sees (view 0's source)."""
    img = open_encoded(record)
    return img if isinstance(img, np.ndarray) else img.decode()[0]


def compute(teacher: DualEncoder, captioner: Captioner | CachedCaptions, sampling: Sampling, records: Sequence[Record],
            layout: Layout, todo: Sequence[Chunk], *, seed: int, features: bool, bf16: bool, batch_size: int,
            bar: Any) -> None:
    """Caption and embed every synthetic-caption chunk in ``todo``, committing each (strings, arrays, then its
    marker) before the next: a killed build loses at most the chunk it was writing."""
    segment = layout.root.name
    for chunk in todo:
        recs = records[chunk.lo:chunk.hi]
        if isinstance(captioner, CachedCaptions):  # written once by another cache's build: only embedded here
            captions = captioner.captions_for(segment, chunk, [r.key for r in recs], sampling.n)
        else:
            captions = captioner.caption([raw_image(r) for r in recs], sampling,
                                         chunk_seed(seed, segment, chunk.index))
        flat = [c for caps in captions for c in caps]
        arrays = {a: np.empty((len(flat), *stored_row(layout.arrays[a], layout.dtype)[1:]), DTYPES[layout.dtype])
                  for a in layout.arrays_of("syncap")}
        for lo in range(0, len(flat), batch_size):
            out = teacher_outputs(teacher, None, flat[lo:lo + batch_size], bf16=bf16, features=features)
            for a in arrays:
                arrays[a][lo:lo + batch_size] = to_storage(out[a.replace("syncap", "text")], layout.dtype)
        arrays = {a: v.reshape(len(recs), sampling.n, -1) for a, v in arrays.items()}
        write_strings(layout.root, strings_name(chunk), flat)
        table = StringTable(layout.root, strings_name(chunk))
        commit_chunk(layout, chunk, arrays, extra={"strings": {
            "count": len(flat), "sha256": hashlib.sha256(table.data.tobytes()).hexdigest(),
            "offsets_sha256": array_sha256(np.asarray(table.offsets))}})
        bar.update(chunk.hi - chunk.lo)


def check_strings(layout: Layout, chunk: Chunk, marker: dict[str, Any], deep: bool) -> str | None:
    """A committed chunk's caption table against its marker; the problem in words, or None."""
    n = layout.arrays["syncap_embeds"][0] if "syncap_embeds" in layout.arrays else 0
    try:
        table = StringTable(layout.root, strings_name(chunk))
        count = len(table)
        offsets = np.asarray(table.offsets)
    except CacheError as e:
        return str(e)
    want = marker.get("strings", {})
    if count != (chunk.hi - chunk.lo) * n or count != want.get("count"):
        return (f"{layout.root / strings_name(chunk)}: holds {count} synthetic captions, expected "
                f"{(chunk.hi - chunk.lo) * n} ({n} per sample)")
    if np.any(np.diff(offsets.astype(np.int64)) < 0) or int(offsets[-1]) != len(table.data):
        return f"{layout.root / strings_name(chunk)}: its offsets are not a valid string table"
    if deep and (hashlib.sha256(table.data.tobytes()).hexdigest() != want.get("sha256")
                 or array_sha256(offsets) != want.get("offsets_sha256")):
        return (f"{layout.root / strings_name(chunk)}: contents differ from the checksum in its marker (corrupted); "
                "delete the marker and rerun `mmkd cache` to recompute the chunk")
    return None


def string_files(chunk: Chunk) -> set[str]:
    return {f"{strings_name(chunk)}.{part}.npy" for part in ("bytes", "offsets")}


# ------------------------------------------------------------------------------------------------ training side


def draw(seed: int, keys: Sequence[str], step: int, n: int) -> list[int]:
    """Which of its ``n`` synthetic captions each sample uses at ``step``: a pure function of (seed, key, step),
    the same for any worker, process count or resume."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{k}:{step}".encode(), digest_size=8).digest(), "little") % n
            for k in keys]


class SyntheticCaptions:
    """Training's view of a cache's synthetic captions: ``captions(keys, step)`` draws one per key (with its
    index), ``all_captions(keys)`` lists every one (to table a frozen text tower's features)."""

    def __init__(self, cache: Any, seed: int, unpaired: bool = False, weight: float = 1.0) -> None:
        self.cache, self.seed, self.unpaired, self.weight = cache, seed, unpaired, weight
        self.n = synthetic_count(cache)
        if self.n == 0:
            raise CacheError(f"the teacher cache {cache.root} holds no synthetic captions (data.synthetic_captions "
                             "is on): build a cache with them, `mmkd cache --captioner MODEL --synthetic-captions N "
                             "--out NEW_DIR`, and train from that")

    def __call__(self, keys: Sequence[str], step: int) -> tuple[list[str], list[int]]:
        idx = draw(self.seed, keys, step, self.n)
        return [caps[i] for caps, i in zip(self.table(keys), idx)], idx

    def table(self, keys: Sequence[str]) -> list[list[str]]:
        """Each key's N synthetic captions."""
        rows = self.cache.image_rows(list(keys))
        starts, per = self.cache.sample_starts, self.cache.layouts[0].chunk_rows
        out = []
        for row in rows.tolist():
            seg = int(np.searchsorted(starts, row, side="right")) - 1
            local = row - int(starts[seg])
            table = self.cache.strings(seg, local // per)
            off = (local % per) * self.n
            out.append([table[off + j] for j in range(self.n)])
        return out

    def all_captions(self, keys: Sequence[str]) -> list[str]:
        return [c for caps in self.table(keys) for c in caps]


def synthetic_count(cache: Any) -> int:
    """Synthetic captions per sample a cache holds (0: none)."""
    shape = cache.layouts[0].arrays.get("syncap_embeds") if cache.layouts else None
    return int(shape[0]) if shape else 0


def check_same_captions(first: Any, other: Any) -> None:
    """An ensemble's caches must hold the same synthetic captions (training draws the first cache's and asks each
    cache for its teacher's targets of them): the same captioner weights, sampling, seed and chunking."""
    def key(cache: Any) -> Any:
        fp = dict(cache.info.captioner or {})
        fp.pop("source", None)  # (names the captioner for people)
        return fp, cache.info.chunk_rows

    if key(first) != key(other):
        raise CacheError(f"teacher caches {first.root} and {other.root} hold different synthetic captions (captioner "
                         "weights, sampling, seed or --chunk-rows differ): an ensemble's caches must be built with the "
                         "same --captioner settings, --seed and --chunk-rows")


class CachedCaptions:
    """Another cache's synthetic captions, reused (``mmkd cache --captioner cache:DIR``): captioning is the costly
    part of a build and does not depend on the teacher, so each teacher of an ensemble embeds the captions written
    once. The new cache's fingerprint is the source's (same captioner, sampling and seed), so an ensemble of the two
    passes ``check_same_captions``; the source must have the same chunk rows and hold every chunk it is asked for."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.info = CacheInfo.read(self.root)
        fp = self.info.captioner
        if not fp:
            raise CacheError(f"--captioner cache:{self.root}: that cache holds no synthetic captions to reuse; give a "
                             "cache built with --captioner MODEL --synthetic-captions N (or the model itself)")
        self.fingerprint = dict(fp)
        self.source = cache_value(self.root)

    def sampling(self, n: int, seed: int, chunk_rows: int) -> Sampling:
        """The source's sampling settings, checked against this build's (the captions depend on all of them)."""
        fp, rows = self.fingerprint, self.info.chunk_rows
        source = Sampling(**fp["sampling"])
        for flag, mine, theirs in (("--synthetic-captions", n, source.n), ("--seed", seed, fp["seed"]),
                                   ("--chunk-rows", chunk_rows, rows)):
            if mine != theirs:
                raise CacheError(f"--captioner cache:{self.root}: its captions were written with {flag} {theirs}, "
                                 f"this build has {mine}; give {flag} {theirs} to reuse them")
        return source

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.fingerprint.items() if k not in ("sampling", "seed")}

    def to(self, device: Any) -> CachedCaptions:
        return self

    def captions_for(self, segment: str, chunk: Chunk, keys: Sequence[str], n: int) -> list[list[str]]:
        """The source's captions of one chunk, after checking it holds that chunk for the same sample keys."""
        folder = self.root / "segments" / segment
        if not (folder / f"{chunk.name}.done.json").is_file():
            raise CacheError(f"--captioner cache:{self.root}: it has no finished synthetic captions for segment "
                             f"{segment} chunk {chunk.index} (build it over the same data first, or caption here "
                             "with --captioner MODEL)")
        theirs = StringTable(folder, "keys").all()[chunk.lo:chunk.hi]
        if theirs != list(keys):
            raise CacheError(f"--captioner cache:{self.root}: segment {segment} holds other samples than this build "
                             f"(first differing key {next(a for a, b in zip(theirs + [''], keys) if a != b)!r}); "
                             "reuse captions only from a cache of the same data")
        flat = StringTable(folder, strings_name(chunk)).all()
        return [flat[i * n:(i + 1) * n] for i in range(len(keys))]
