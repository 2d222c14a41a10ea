"""Importing embeddings computed elsewhere (clip-retrieval's layout, ``clip_retrieval``) as a teacher cache of one
view, so a user with embeddings from a hosted model or from clip-retrieval distils without any teacher weights.

Why a cache, not a new kind of teacher: the import is written through the same format (segments per data shard,
manifest, memory-mapped key index), so ``teacher: cache:DIR`` reads it with no special case. What the import
cannot hold is recorded in ``meta.json`` (``fingerprint.imported``): no teacher weights or tokenizer (the student's
towers come from elsewhere), no pooled features, only view 0 (the plain image), so training that needs more is
refused by ``CachedTeacher.check`` in one line.

Rows are matched to the training data's samples by key (the metadata's ``key`` column, else its ``image_path``,
which clip-retrieval fills with the sample's ``__key__`` for WebDataset input) or by image file path
(``image_path`` against each sample's image file, both resolved to absolute real paths); ``auto`` takes whichever
matches more rows. Every mismatch is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.data.records import Record
from mmkd.data.transforms import TRANSFORM_VERSION, TransformConfig, augmentation_settings
from mmkd.locking import FolderLock
from mmkd.models.dual_encoder import EncoderMeta
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache.build import by_shard
from mmkd.teacher.cache.clip_retrieval import Partition, list_partitions, load_embeddings, read_metadata
from mmkd.teacher.cache.folder import prepare_folder, prepare_segment, publish, segment_meta
from mmkd.teacher.cache.format import (
    DONE_FILE,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    NORM_TOLERANCE,
    SEGMENTS,
    CacheError,
    Layout,
    commit_chunk,
    row_format,
    segment_name,
    to_storage,
    write_json,
)

MATCHES = ("auto", "key", "path")
IMPORT_DTYPES = ("auto", "float16", "bfloat16", "float32", "int8")
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained temperature (1/0.01), where the source's is not known
BLOCK = 1 << 16  # rows checked at a time


@dataclass
class ImportResult:
    root: Path
    n_samples: int
    n_captions: int
    dim: int
    match: str
    dtype: str
    renormalised: int  # rows whose norm was off unit by more than the storage's tolerance, normalised on import


@dataclass
class _Source:
    """Every partition's arrays (memory-mapped) and metadata, with global row offsets."""

    parts: list[Partition]
    imgs: list[np.ndarray]
    texts: list[np.ndarray] | None
    metas: list[dict[str, list[Any]]]
    starts: np.ndarray  # global row of each partition's first row, and the total last

    def where(self, row: int) -> tuple[Partition, int]:
        p = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.parts[p], row - int(self.starts[p])

    def column(self, name: str) -> list[Any] | None:
        if not all(name in m for m in self.metas):
            return None
        return [v for m in self.metas for v in m[name]]

    def gather(self, arrays: list[np.ndarray], rows: np.ndarray, tol: float) -> tuple[np.ndarray, int]:
        """Rows (global numbers) as float32, rows off unit norm by more than ``tol`` normalised; (rows, count)."""
        out = np.empty((len(rows), arrays[0].shape[1]), np.float32)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(part):
            sel = np.nonzero(part == p)[0]
            local = rows[sel] - self.starts[p]
            order = np.argsort(local, kind="stable")  # a memory map reads fastest in order
            out[sel[order]] = np.asarray(arrays[p][local[order]], np.float32)
        norms = np.linalg.norm(out, axis=1)
        off = np.abs(norms - 1) > tol
        out[off] /= norms[off, None]
        return out, int(off.sum())


def _read_source(src: Path) -> _Source:
    parts = list_partitions(src)
    imgs, texts, metas = [], [], []
    dim = None
    for p in parts:
        img = load_embeddings(p.img)
        meta = read_metadata(p.metadata)
        n_meta = len(next(iter(meta.values())))
        if len(img) != n_meta:
            raise CacheError(f"{p.img} has {len(img)} rows but {p.metadata} has {n_meta}: the embeddings and the "
                             "metadata of a partition must be row-aligned (one metadata row per embedding)")
        if dim is None:
            dim, first = img.shape[1], p.img
        elif img.shape[1] != dim:
            raise CacheError(f"{p.img} holds {img.shape[1]}-wide embeddings but {first} {dim}-wide: every partition "
                             "must come from the same model")
        if p.text is not None:
            text = load_embeddings(p.text)
            if len(text) != len(img):
                raise CacheError(f"{p.text} has {len(text)} rows but {p.img} has {len(img)}: image and text "
                                 "embeddings of a partition must be row-aligned")
            if text.shape[1] != img.shape[1]:
                raise CacheError(f"{p.text} holds {text.shape[1]}-wide embeddings but {p.img} {img.shape[1]}-wide: "
                                 "image and text embeddings must share one embedding space")
            if "caption" not in meta:
                raise CacheError(f"{p.metadata} has no caption column, but {p.text} holds text embeddings: each text "
                                 "embedding needs its caption")
            texts.append(text)
        imgs.append(img)
        metas.append(meta)
    starts = np.concatenate([[0], np.cumsum([len(a) for a in imgs])]).astype(np.int64)
    return _Source(parts, imgs, texts if parts[0].text is not None else None, metas, starts)


def _check_values(paths: Sequence[Path], arrays: Sequence[np.ndarray]) -> None:
    """Non-finite values and zero embeddings, refused naming the file and row."""
    for path, arr in zip(paths, arrays):
        for lo in range(0, len(arr), BLOCK):
            block = np.asarray(arr[lo:lo + BLOCK], np.float32)
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                raise CacheError(f"{path}: row {lo + int(np.argmax(bad))} holds NaN or infinite values "
                                 f"({int(bad.sum())} such row(s) in this block); recompute or drop those rows")
            zero = np.linalg.norm(block, axis=1) == 0
            if zero.any():
                raise CacheError(f"{path}: row {lo + int(np.argmax(zero))} is an all-zero embedding (it cannot be "
                                 "normalised); recompute or drop it")


def _path_id(p: Any) -> str:
    return os.path.realpath(os.path.expanduser(str(p)))


def _match_rows(source: _Source, records: Sequence[Record], match: str) -> tuple[np.ndarray, str, str]:
    """(record index of each imported row, the match used, the metadata column it read)."""
    if match not in MATCHES:
        raise CacheError(f"--match {match!r} unknown; valid: {', '.join(MATCHES)}")
    key_col = "key" if source.column("key") is not None else "image_path"
    keys = {r.key: i for i, r in enumerate(records)}

    def by_key() -> np.ndarray:
        return np.array([keys.get(str(v), -1) for v in source.column(key_col) or []], np.int64)

    def by_path() -> np.ndarray:
        paths = {_path_id(r.image): i for i, r in enumerate(records) if isinstance(r.image, (str, os.PathLike))}
        return np.array([paths.get(_path_id(v), -1) if v is not None else -1
                         for v in source.column("image_path") or []], np.int64)

    if match == "key" or (match == "auto" and source.column("image_path") is None):
        return by_key(), "key", key_col
    if match == "path":
        if source.column("image_path") is None:
            raise CacheError(f"--match path needs an image_path column; {source.parts[0].metadata} has none")
        return by_path(), "path", "image_path"
    k = by_key()
    if (k >= 0).all():
        return k, "key", key_col
    p = by_path()
    return (k, "key", key_col) if (k >= 0).sum() >= (p >= 0).sum() else (p, "path", "image_path")


def _check_match(source: _Source, records: Sequence[Record], rec_of_row: np.ndarray, match: str, col: str,
                 src: Path) -> None:
    values = source.column(col) or []
    unmatched = np.nonzero(rec_of_row < 0)[0]
    if len(unmatched):
        part, local = source.where(int(unmatched[0]))
        raise CacheError(f"{len(unmatched)} of the {len(rec_of_row)} imported rows name images that are not in the "
                         f"data (matched by {match}): e.g. row {local} of {part.metadata}, {col} "
                         f"{values[int(unmatched[0])]!r}. Give --data that holds every imported image, or match "
                         "the other way (--match key: sample keys; --match path: image file paths)")
    order = np.argsort(rec_of_row, kind="stable")
    dup = np.nonzero(rec_of_row[order][1:] == rec_of_row[order][:-1])[0]
    if len(dup):
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        (pa, la), (pb, lb) = source.where(a), source.where(b)
        raise CacheError(f"row {la} of {pa.metadata} and row {lb} of {pb.metadata} both name sample "
                         f"{records[int(rec_of_row[a])].key!r}: an image must have one embedding; drop one of them")
    if len(rec_of_row) < len(records):
        held = np.zeros(len(records), bool)
        held[rec_of_row] = True
        absent = np.nonzero(~held)[0]
        r = records[int(absent[0])]
        raise CacheError(f"{len(absent)} of the data's {len(records)} images have no embedding in {src} (matched by "
                         f"{match}), e.g. sample {r.key!r}{f' ({r.origin})' if r.origin and r.origin != r.key else ''}"
                         ": import embeddings of every training image, or give as --data only the imported images")


def _caption_rows(source: _Source, records: Sequence[Record], rec_of_row: np.ndarray) -> dict[str, int]:
    """Each data caption's imported row (the data's own string, matched to the metadata's ignoring surrounding
    whitespace: clip-retrieval reads .txt files whole, newline included)."""
    rows: dict[str, int] = {}
    captions = source.column("caption") or []
    for row, (ri, cap) in enumerate(zip(rec_of_row.tolist(), captions)):
        r = records[ri]
        if not r.captions:
            continue  # an image the data holds without captions (unpaired): its text embedding is not needed
        want = str(cap).strip() if cap is not None else None
        hit = next((c for c in r.captions if c.strip() == want), None)
        if hit is None:
            part, local = source.where(row)
            raise CacheError(f"row {local} of {part.metadata}: caption {cap!r} is not a caption of sample {r.key!r} "
                             f"in the data (its captions: {list(r.captions)[:3]}): the rows do not match the data")
        rows.setdefault(hit, row)
    lost = [(c, r) for r in records for c in r.captions if c not in rows]
    if lost:
        c, r = lost[0]
        raise CacheError(f"{len(lost)} caption(s) of the data have no text embedding in the import, e.g. {c!r} of "
                         f"sample {r.key!r}: clip-retrieval embeds one caption per image, so give data whose captions "
                         "are the imported ones")
    return rows


def _files_sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def import_meta(source: _Source, src: Path, *, match: str, dtype: str, logit_scale: float, chunk_rows: int,
                digest: str) -> dict[str, Any]:
    """meta.json of an imported cache: the layout of a one-view cache without features, and what is absent."""
    dim = int(source.imgs[0].shape[1])
    arrays: dict[str, list[int]] = {"image_embeds": [1, dim]}
    if source.texts is not None:
        arrays["text_embeds"] = [dim]
    em = EncoderMeta()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": {
            "teacher": {"source": f"import:{src.resolve()}", "weights_sha256": f"imported:{digest}",
                        "config_sha256": None, "tokenizer_sha256": None, "projection_dim": dim, "feature_dims": {},
                        "logit_scale": float(logit_scale), "meta": em.to_json()},
            # view 0 is the plain image: no seed or crop decides it, so these are the defaults, never compared
            "transform": {"image_size": em.image_size, "image_mean": list(em.image_mean),
                          "image_std": list(em.image_std),
                          "augmentation": augmentation_settings(TransformConfig(em.image_size, em.image_mean,
                                                                                em.image_std)),
                          "view_seed": 0, "version": TRANSFORM_VERSION},
            "views": 1,
            "storage": {"dtype": dtype, "features": False, "precision": "imported"},
            "imported": {"from": str(src.resolve()), "layout": "clip-retrieval", "match": match,
                         "rows": int(source.starts[-1]), "text": source.texts is not None, "sha256": digest,
                         "absent": ["teacher weights", "tokenizer", "pooled features", "views > 0"]},
        },
        "layout": {"chunk_rows": int(chunk_rows), "arrays": arrays, "numpy_dtype": DTYPES[dtype].str,
                   **row_format(dtype)},
    }


def import_embeddings(src: str | os.PathLike, records: Sequence[Record], out: str | os.PathLike, *,
                      match: str = "auto", dtype: str = "auto", logit_scale: float = DEFAULT_LOGIT_SCALE,
                      chunk_rows: int = 1024, log: Callable[[str], None] | None = None) -> ImportResult:
    """Write the embeddings in clip-retrieval folder ``src`` as a one-view teacher cache ``out`` over ``records``.

    dtype: the storage type; ``auto`` keeps float16 input as float16 (bit-exact), anything else as float32.
    logit_scale: the teacher's temperature scale (exp'd) that logit objectives (``kl``…) use. Rows whose norm is off
    unit by more than the storage's tolerance are normalised (counted in the result). Everything is checked before
    a file is written; a rerun of the same import completes or leaves an earlier one as it is.
    """
    src = Path(src)
    if dtype not in IMPORT_DTYPES:
        raise CacheError(f"--dtype {dtype!r} unknown; valid: {', '.join(IMPORT_DTYPES)}")
    if not (logit_scale > 0 and np.isfinite(logit_scale)):
        raise CacheError(f"--logit-scale must be a positive number, got {logit_scale}")
    if chunk_rows < 1:
        raise CacheError(f"--chunk-rows must be ≥ 1, got {chunk_rows}")
    if not records:
        raise CacheError("no records to import embeddings for: the data is empty")
    dup = _first_duplicate([r.key for r in records])
    if dup is not None:
        raise CacheError(f"sample key {dup!r} appears more than once in the data; the cache indexes samples by key")
    source = _read_source(src)
    _check_values([p.img for p in source.parts], source.imgs)
    if source.texts is not None:
        _check_values([p.text for p in source.parts if p.text is not None], source.texts)
    rec_of_row, used, col = _match_rows(source, records, match)
    _check_match(source, records, rec_of_row, used, col, src)
    caption_row = _caption_rows(source, records, rec_of_row) if source.texts is not None else {}
    if dtype == "auto":
        dtype = "float16" if all(a.dtype == np.float16 for a in [*source.imgs, *(source.texts or [])]) else "float32"
    files = [f for p in source.parts for f in (p.img, p.text, p.metadata) if f is not None]
    meta = import_meta(source, src, match=used, dtype=dtype, logit_scale=logit_scale, chunk_rows=chunk_rows,
                       digest=_files_sha256(files))
    row_of_rec = np.empty(len(records), np.int64)
    row_of_rec[rec_of_row] = np.arange(len(rec_of_row))
    index_of = {id(r): i for i, r in enumerate(records)}
    root, tol = Path(out), NORM_TOLERANCE[dtype] / 2
    renormalised = 0
    groups = by_shard(records)
    with FolderLock(root, "teacher cache folder"):
        prepare_folder(root, meta, None, log)
        for shard, recs in groups:
            folder = root / SEGMENTS / segment_name(shard)
            keys = [r.key for r in recs]
            captions = sorted({c for r in recs for c in r.captions}) if source.texts is not None else []
            prepare_segment(folder, segment_meta(shard, keys, fp.record_digests(recs), captions), keys,
                            fp.record_digests(recs), captions, log)
            layout = Layout.of_segment(folder, meta, len(keys), len(captions))
            img_rows = row_of_rec[[index_of[id(r)] for r in recs]]
            text_rows = np.array([caption_row[c] for c in captions], np.int64)
            for c in layout.chunks():
                if layout.marker(c).is_file():
                    for name in layout.arrays_of(c.kind):
                        layout.check_shard(c, name)
                    continue
                if c.kind == "image":
                    x, n = source.gather(source.imgs, img_rows[c.lo:c.hi], tol)
                    arrays = {"image_embeds": _stored(x, dtype)[:, None, :]}
                else:
                    x, n = source.gather(source.texts or [], text_rows[c.lo:c.hi], tol)
                    arrays = {"text_embeds": _stored(x, dtype)}
                renormalised += n
                commit_chunk(layout, c, arrays)
            if not (folder / DONE_FILE).is_file():
                write_json(folder / DONE_FILE, {"shard": shard, "chunks": len(layout.chunks())})
        manifest = publish(root, [segment_name(s) for s, _ in groups], final=True)
    if log:
        log(f"imported {src}: {len(records)} images, {manifest['n_captions']} captions, "
            f"{meta['fingerprint']['teacher']['projection_dim']}-wide, {dtype}, rows matched by {used}"
            + (f"; {renormalised} row(s) were not unit-norm and were normalised" if renormalised else "")
            + f". Train from it with `teacher: cache:{root}` (a student with its own towers: it holds no teacher "
            "weights)")
    return ImportResult(root, len(records), int(manifest["n_captions"]), int(source.imgs[0].shape[1]), used, dtype,
                        renormalised)


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_storage(torch.from_numpy(x), dtype)


def _first_duplicate(keys: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)
    return None
