"""The on-disk format of a teacher cache: where every row lives, how it is stored, and the errors naming a
damaged folder. Builders, the reader and the verifier all derive paths and shapes from here, so they agree by
construction.

Layout of a cache folder (format version 1)::

    meta.json        format, fingerprint (teacher, data, transform, views, storage) and layout
    keys.json        {"keys": [...], "digests": [...]}: row i of the image arrays is sample keys[i]
    captions.json    [...]: row j of the text arrays is caption j (sorted, unique)
    tokenizer/       the teacher's tokenizer (lets a student build a new text tower without the teacher)
    shards/image-00000.image_embeds.npy     [rows, K, D]  normalised embeddings of views 0..K-1
    shards/image-00000.image_features.npy   [rows, K, F]  pooled pre-projection features (--features)
    shards/image-00000.done.json            the chunk's commit marker: row range, shapes, SHA-256 of each array
    shards/text-00000.text_embeds.npy       [rows, D]     (and text_features [rows, F])
    shards/text-00000.done.json

Rows are computed in chunks of ``chunk_rows``. Each shard is written to a temporary file, fsynced and renamed;
the chunk's ``done.json`` is written (atomically) only after all its shards, so it is the commit: a chunk either
has a marker and complete shards or is recomputed by the next run. An interrupted build resumes by skipping
committed chunks, and can never leave a duplicated, missing or half-written row. Under torchrun, chunk g is
built by rank ``g % world``; each chunk is computed the same way whatever rank computes it, so N processes
write the same bytes as one. bfloat16 shards are stored as their raw 16-bit patterns (``<u2``), as numpy has
no bfloat16.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.errors import MmkdError
from mmkd.fileio import atomic_write, atomic_write_json

FORMAT = "mmkd-teacher-cache"
FORMAT_VERSION = 1
DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
PRECISIONS = ("auto", "bf16", "fp32")
IMAGE_ARRAYS = ("image_embeds", "image_features")
TEXT_ARRAYS = ("text_embeds", "text_features")
# every key of meta.json that readers index: checked once on reading, so a damaged file is named, not a KeyError
META_KEYS = ("layout.n_samples", "layout.n_captions", "layout.chunk_rows", "layout.arrays", "fingerprint.views",
             "fingerprint.storage.dtype", "fingerprint.teacher.projection_dim", "fingerprint.teacher.feature_dims",
             "fingerprint.teacher.logit_scale", "fingerprint.teacher.weights_sha256", "fingerprint.teacher.meta",
             "fingerprint.data.sha256", "fingerprint.data.captions_sha256", "fingerprint.transform.view_seed",
             "fingerprint.transform.augmentation", "fingerprint.transform.version")
NORM_TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-4}


class CacheError(MmkdError, ValueError):
    """A cache that cannot be used or built as asked: the message names the file or field and what to do."""


class CacheFingerprintError(CacheError):
    """The cache was built for other data, transforms or another teacher (overridable, at the user's risk)."""


# ------------------------------------------------------------------------------------------------ small helpers


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=1)


def write_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.lib.format.write_array(f, arr, allow_pickle=False))


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path} not found: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); the cache folder is damaged: rebuild it "
                         "(delete the folder and rerun `mmkd cache`)") from None


def array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 tensor (any device) → the stored numpy array (bfloat16 as its raw bit pattern)."""
    t = t.detach().cpu()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.numpy().astype(DTYPES[dtype], copy=False)


def from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy rows → float32 tensor (a fresh buffer, safe to use in autograd)."""
    arr = np.ascontiguousarray(arr)
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()


# -------------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Chunk:
    kind: str  # "image" or "text"
    index: int
    lo: int
    hi: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index:05d}"


@dataclass(frozen=True)
class Layout:
    """Where every row lives: derived from meta.json alone, so readers and writers agree by construction."""

    root: Path
    n_samples: int
    n_captions: int
    chunk_rows: int
    arrays: dict[str, tuple[int, ...]]  # name → trailing shape of one row
    dtype: str

    @classmethod
    def from_meta(cls, root: Path, meta: dict[str, Any]) -> Layout:
        lay = meta["layout"]
        try:
            return cls(root, int(lay["n_samples"]), int(lay["n_captions"]), int(lay["chunk_rows"]),
                       {str(k): tuple(int(x) for x in v) for k, v in lay["arrays"].items()},
                       meta["fingerprint"]["storage"]["dtype"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CacheError(f"{root / 'meta.json'}: its 'layout' is not valid ({type(e).__name__}: {e}; the file is "
                             f"damaged): rebuild the cache (delete {root} and rerun `mmkd cache`)") from None

    def chunks(self, kind: str | None = None) -> list[Chunk]:
        out = []
        for k, n in (("image", self.n_samples), ("text", self.n_captions)):
            if kind in (None, k):
                out += [Chunk(k, i, lo, min(lo + self.chunk_rows, n))
                        for i, lo in enumerate(range(0, n, self.chunk_rows))]
        return out

    def arrays_of(self, kind: str) -> list[str]:
        return [a for a in (IMAGE_ARRAYS if kind == "image" else TEXT_ARRAYS) if a in self.arrays]

    def shard(self, chunk: Chunk, array: str) -> Path:
        return self.root / "shards" / f"{chunk.name}.{array}.npy"

    def marker(self, chunk: Chunk) -> Path:
        return self.root / "shards" / f"{chunk.name}.done.json"

    def shape(self, chunk: Chunk, array: str) -> tuple[int, ...]:
        return (chunk.hi - chunk.lo, *self.arrays[array])

    def check_shard(self, chunk: Chunk, array: str) -> None:
        """Header and size of one committed shard; raise CacheError naming the file (nothing is modified)."""
        path, shape = self.shard(chunk, array), self.shape(chunk, array)
        marker = self.marker(chunk)
        fix = (f"Nothing was changed. To recompute this chunk, delete {marker} and rerun `mmkd cache` with the "
               "same arguments (or delete the whole cache folder to rebuild it)")
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                hdr = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
                offset = f.tell()
        except FileNotFoundError:
            raise CacheError(f"shard {path} is missing although {marker} says its chunk is complete. {fix}") from None
        except (ValueError, OSError, EOFError) as e:
            raise CacheError(f"shard {path} is unreadable or truncated ({e}). {fix}") from None
        got_shape, _, got_dtype = hdr
        if tuple(got_shape) != shape or got_dtype != DTYPES[self.dtype]:
            raise CacheError(f"shard {path} holds a {tuple(got_shape)} {got_dtype} array, expected {shape} "
                             f"{DTYPES[self.dtype]}. {fix}")
        size, expected = path.stat().st_size, offset + int(np.prod(shape)) * DTYPES[self.dtype].itemsize
        if size != expected:
            state = "truncated" if size < expected else "longer than its header says"
            raise CacheError(f"shard {path} is {state}: {size} bytes, expected {expected} for a {shape} "
                             f"{DTYPES[self.dtype]} array. {fix}")


def read_meta(root: Path) -> dict[str, Any]:
    meta = read_json(root / "meta.json", f"{root} is not a teacher cache (build one with `mmkd cache`)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheError(f"{root / 'meta.json'} is not an mmkd teacher cache's metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{root} is a teacher cache of format version {meta.get('format_version')}; this mmkd "
                         f"reads version {FORMAT_VERSION}: rebuild it with `mmkd cache`")
    for dotted in META_KEYS:
        node: Any = meta
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CacheError(f"{root / 'meta.json'} has no key {dotted!r} (the file is damaged): rebuild the "
                                 f"cache (delete {root} and rerun `mmkd cache`)")
            node = node[part]
    dtype = meta["fingerprint"]["storage"]["dtype"]
    if dtype not in DTYPES:
        raise CacheError(f"{root / 'meta.json'}: fingerprint.storage.dtype {dtype!r} is not one of "
                         f"{', '.join(DTYPES)} (the file is damaged): rebuild the cache")
    return meta


INDEX_NAMES = ("meta.json", "keys.json", "captions.json", "tokenizer", "shards")  # what a cache folder holds
LOCK_NAME = ".lock"  # mmkd.locking.FolderLock's file: one build per folder
