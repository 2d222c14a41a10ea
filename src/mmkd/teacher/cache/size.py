"""What a teacher cache costs to store, per sample: the embedding arrays alone, and the whole folder.

Why: dataset reinforcement trades disk for training compute (MobileCLIP's DataCompDR stores 10-30 views per image
from two teachers), so the bytes per sample of each setting (views, storage dtype, features, teachers, synthetic
captions) is the number to compare. Arrays are counted by their data bytes (shape × item size, read from each
``.npy`` header: no array is loaded), so the arithmetic is exact; the folder total counts every file's size
(``.npy`` headers, indexes, keys, captions, metadata, tokenizer).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.teacher.cache.format import SEGMENTS, CacheError, read_manifest
from mmkd.teacher.cache.info import CacheInfo

CHUNK_ARRAY = re.compile(r"^[a-z_]+-\d{5}\.(?P<array>[A-Za-z0-9_]+)\.npy$")  # a chunk's array file (format.Layout)


@dataclass(frozen=True)
class CacheSize:
    """Bytes of a cache: ``arrays`` (name → data bytes over the finished segments) and ``folder`` (every file)."""

    root: Path
    n_samples: int
    n_captions: int
    views: int
    dtype: str
    arrays: dict[str, int]
    folder: int

    @property
    def embedding_bytes(self) -> int:
        return sum(self.arrays.values())

    @property
    def embedding_bytes_per_sample(self) -> float:
        return self.embedding_bytes / self.n_samples if self.n_samples else 0.0

    @property
    def folder_bytes_per_sample(self) -> float:
        return self.folder / self.n_samples if self.n_samples else 0.0

    def per_sample(self) -> dict[str, float]:
        """Each array's data bytes per sample (text arrays: all of a sample's captions, on average)."""
        return {k: v / self.n_samples if self.n_samples else 0.0 for k, v in self.arrays.items()}

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in self.per_sample().items())
        return (f"bytes per sample: {self.embedding_bytes_per_sample:,.1f} in embedding arrays ({parts}); "
                f"{self.folder_bytes_per_sample:,.1f} for the whole folder ({self.folder:,} bytes, "
                f"{self.n_samples} samples × {self.views} view(s), {self.dtype})")

    def to_json(self) -> dict[str, object]:
        return {"n_samples": self.n_samples, "n_captions": self.n_captions, "views": self.views, "dtype": self.dtype,
                "arrays": dict(self.arrays), "embedding_bytes": self.embedding_bytes, "folder_bytes": self.folder,
                "embedding_bytes_per_sample": self.embedding_bytes_per_sample,
                "folder_bytes_per_sample": self.folder_bytes_per_sample}


def _data_bytes(path: Path) -> int:
    """Shape × item size of an ``.npy`` file, from its header alone."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
    except (OSError, ValueError, EOFError) as e:
        raise CacheError(f"{path}: unreadable array header ({e}); check the cache with `mmkd cache --verify`") from None
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def cache_size(path: str | os.PathLike) -> CacheSize:
    """Bytes per sample of the cache at ``path``: its finished segments' arrays, and every file in the folder.

    Samples are those of the manifest's segments (a partial build's unfinished segments are in the folder total but
    not in the sample count). Several caches used together (an ensemble of teachers) cost the sum of theirs."""
    root = Path(path)
    info = CacheInfo.read(root)
    manifest = read_manifest(root)
    segments = manifest["segments"] if manifest else []
    arrays: dict[str, int] = {name: 0 for name in info.arrays}
    for seg in segments:
        folder = root / SEGMENTS / seg["name"]
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            m = CHUNK_ARRAY.match(p.name)
            if m:
                arrays[m["array"]] = arrays.get(m["array"], 0) + _data_bytes(p)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return CacheSize(root, sum(int(s["n_samples"]) for s in segments), sum(int(s["n_captions"]) for s in segments),
                     info.views, info.dtype, arrays, total)
