"""Exporting a teacher cache to clip-retrieval's layout (``clip_retrieval``), for FAISS/autofaiss indexing or any
tool that reads it: one partition per cache segment, view 0 (the plain image) of each sample.

The cache stores each segment's distinct captions, not which caption belongs to which image, so text embeddings
(row-aligned with the images, as the layout has them) are exported only where the data is given: each sample
gets the first of its captions the cache holds. Without the data, or where a sample has no cached caption (an
unpaired image), the export holds images only, as clip-retrieval's own with ``--enable_text False``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.data.records import Record
from mmkd.teacher.cache.clip_retrieval import IMG, META, TEXT, partition_digits, pyarrow_parquet, write_partition
from mmkd.teacher.cache.format import CacheError, StringTable
from mmkd.teacher.cache.read import CachedTeacher


@dataclass
class ExportResult:
    root: Path
    n_samples: int
    partitions: int
    text: bool
    note: str = ""  # why text embeddings were left out, where they were


def _native(stored_dtype: str) -> np.dtype:
    """The exported dtype: float16 and float32 as stored (bit-exact); bfloat16, which numpy lacks, and int8
    (dequantised: clip-retrieval's readers expect floats) as float32."""
    return np.dtype("<f2") if stored_dtype == "float16" else np.dtype("<f4")


def export_cache(cache_dir: str | os.PathLike, out: str | os.PathLike, records: Sequence[Record] | None = None,
                 log: Callable[[str], None] | None = None) -> ExportResult:
    """Write the cache at ``cache_dir`` as a new clip-retrieval folder ``out`` (refused if it exists non-empty).

    ``records``: the data the cache was built from, for row-aligned captions and image paths (metadata
    ``image_path`` is the sample's image file where it has one, else its key; ``key`` is always the key). The
    folder is written beside ``out`` and renamed into place when complete, so ``out`` is never half-written."""
    pyarrow_parquet()  # fail before any work when pyarrow is absent
    cache = CachedTeacher.open(cache_dir)
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CacheError(f"{root} exists and is not empty: the export writes a new folder; choose another --out "
                         "(nothing was changed)")
    by_key = {r.key: r for r in records} if records is not None else None
    segments = [StringTable(f, "keys").all() for f in cache.folders]
    captions, note = _captions(cache, segments, by_key)
    dtype = _native(cache.layouts[0].dtype)
    digits = partition_digits(len(segments))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        for sub in (IMG, META, *([TEXT] if captions is not None else [])):
            (tmp / sub).mkdir()
        for i, keys in enumerate(segments):
            img = cache.images(keys)["image_embeds"].numpy().astype(dtype)
            text = None
            columns = {"image_path": [_image_path(by_key, k) for k in keys], "key": list(keys)}
            if captions is not None:
                text = cache.texts(captions[i])["text_embeds"].numpy().astype(dtype)
                columns["caption"] = captions[i]
            write_partition(tmp, i, digits, img, text, columns)
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(len(k) for k in segments)
    if log:
        log(f"exported {cache.root} to {root}: {n} image embeddings (view 0) in {len(segments)} partition(s)"
            + (" with their captions' text embeddings" if captions is not None else f"; no text embeddings: {note}")
            + f"; index them with e.g. `autofaiss build_index --embeddings={root / IMG}`")
    return ExportResult(root, n, len(segments), captions is not None, note)


def _image_path(by_key: dict[str, Record] | None, key: str) -> str:
    r = by_key.get(key) if by_key is not None else None
    return str(r.image) if r is not None and isinstance(r.image, (str, os.PathLike)) else key


def _captions(cache: CachedTeacher, segments: list[list[str]], by_key: dict[str, Record] | None
              ) -> tuple[list[list[str]] | None, str]:
    """Each segment's row-aligned captions (the first cached caption of each sample), or None and why not."""
    if "text_embeds" not in cache.arrays:
        return None, "the cache holds no text embeddings"
    if by_key is None:
        return None, "the cache does not record which caption belongs to which image: give --data to export them"
    held = set(cache.captions)
    out = []
    for keys in segments:
        row = []
        for k in keys:
            r = by_key.get(k)
            if r is None:
                raise CacheError(f"sample {k!r} of the cache {cache.root} is not in --data: give the data the cache "
                                 "was built from (or export without --data: images only)")
            c = next((c for c in r.captions if c in held), None)
            if c is None:
                return None, (f"sample {k!r} has no cached caption (an image without captions): the layout pairs "
                              "every image with one caption")
            row.append(c)
        out.append(row)
    return out, ""
