"""The on-disk format of a teacher cache: where every row lives, how it is stored, and the errors naming a
damaged folder. Builders, the reader and the verifier all derive paths and shapes from here, so they agree by
construction.

Layout of a cache folder (format version 2)::

    meta.json          format, fingerprint (teacher, transform, views, storage) and layout (chunk rows, arrays)
    manifest.json      the finished segments in row order, and the key index generation that covers them
    index/G.keys.hash.npy / G.keys.row.npy          every sample key's 64-bit hash, sorted, and its global row
    index/G.captions.hash.npy / G.captions.row.npy  the same for captions
    tokenizer/         the teacher's tokenizer (lets a student build a new text tower without the teacher)
    segments/NAME/     one segment per data shard (a WebDataset tar; one for all in-memory records):
        segment.json                     its shard, sample and caption counts and data fingerprint (written first)
        keys.bytes.npy / keys.offsets.npy / keys.hash.npy   row i is sample key i (UTF-8 bytes + offsets), its hash
        digests.bytes.npy / digests.offsets.npy             each sample's content digest
        captions.bytes.npy / captions.offsets.npy / captions.hash.npy   its sorted distinct captions
        image-00000.image_embeds.npy     [rows, K, D]  normalised embeddings of views 0..K-1
        image-00000.image_features.npy   [rows, K, F]  pooled pre-projection features (--features)
        image-00000.done.json            the chunk's commit marker: row range, shapes, SHA-256 of each array
        text-00000.text_embeds.npy       [rows, D]     (and text_features [rows, F])
        syncap-00000.syncaps.bytes.npy / .offsets.npy   (--captioner) N synthetic captions per sample, row-major
        syncap-00000.syncap_embeds.npy   [rows, N, D]  the teacher's text embeddings of them (syncap_features: F)
        done.json                        the segment's commit: written after all its chunks

A segment's rows are computed in chunks of ``chunk_rows``. Each file is written to a temporary file, fsynced and
renamed; a chunk's ``done.json`` is written only after all its arrays, a segment's after all its chunks, and the
manifest (with a new index generation, written before it) only lists committed segments. So a killed build
resumes chunk by chunk and never leaves a duplicated, missing or half-written row, and a reader sees the
segments of the last manifest, whole. A dataset with added shards gets new segments; the old ones are never
rewritten. Under torchrun, data segment g is built by rank ``g % world``; rank 0 writes the manifest after a
barrier. bfloat16 arrays are stored as their raw 16-bit patterns (``<u2``), as numpy has no bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.errors import MmkdError
from mmkd.fileio import atomic_write, atomic_write_json

FORMAT = "mmkd-teacher-cache"
FORMAT_VERSION = 2
DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}
# int8 rows: symmetric per-vector quantisation, x ≈ q·s with s = max|x|/127; each row carries its float32 scale in
# 4 bytes after its D values, so one .npy per array stays one row per sample (gathers and checks are unchanged)
INT8_SCALE = np.dtype("<f4")
PRECISIONS = ("auto", "bf16", "fp32")
IMAGE_ARRAYS = ("image_embeds", "image_features")
TEXT_ARRAYS = ("text_embeds", "text_features")
SYNCAP_ARRAYS = ("syncap_embeds", "syncap_features")  # synthetic captions' text targets, [rows, N, D] per sample
KIND_ARRAYS = {"image": IMAGE_ARRAYS, "text": TEXT_ARRAYS, "syncap": SYNCAP_ARRAYS}
# every key of meta.json that readers index: checked once on reading, so a damaged file is named, not a KeyError
META_KEYS = ("layout.chunk_rows", "layout.arrays", "fingerprint.views",
             "fingerprint.storage.dtype", "fingerprint.teacher.projection_dim", "fingerprint.teacher.feature_dims",
             "fingerprint.teacher.logit_scale", "fingerprint.teacher.weights_sha256", "fingerprint.teacher.meta",
             "fingerprint.transform.view_seed", "fingerprint.transform.augmentation", "fingerprint.transform.version")
NORM_TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-4, "int8": 1.6e-2}


class CacheError(MmkdError, ValueError):
    """A cache that cannot be used or built as asked: the message names the file or field and what to do."""


class CacheFingerprintError(CacheError):
    """The cache was built for other data, transforms or another teacher (overridable, at the user's risk)."""


# ------------------------------------------------------------------------------------------------ small helpers


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=1)


def write_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.lib.format.write_array(f, arr, allow_pickle=False))


def read_json_or_none(path: Path) -> Any:
    """A small JSON file's value, None when it is absent or unreadable (an optional file, e.g. a shard stamp)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def stored_row(shape: Sequence[int], dtype: str) -> tuple[int, ...]:
    """The trailing shape of one row as stored: an int8 row holds its D values and its scale's 4 bytes."""
    shape = tuple(int(x) for x in shape)
    return (*shape[:-1], shape[-1] + INT8_SCALE.itemsize) if dtype == "int8" else shape


def row_format(dtype: str) -> dict[str, str]:
    """What meta.json's layout says of a row beyond its dtype (int8: where the scale is and how to dequantise)."""
    if dtype != "int8":
        return {}
    return {"row_format": "int8 symmetric per-vector: D int8 values q, then the float32 scale s (little-endian, "
                          "4 bytes); x = q * s, s = max|x| / 127"}


def quantise_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): int8 values and the per-vector scale, |x - q·s| ≤ s/2 elementwise (a zero vector gets s = 1)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 tensor (any device) → the stored numpy array (bfloat16 as its raw bit pattern; int8 rows with their
    scale's bytes appended, see ``stored_row``)."""
    t = t.detach().cpu()
    if dtype == "int8":
        q, scale = quantise_int8(t.float())
        out = np.empty((*q.shape[:-1], q.shape[-1] + INT8_SCALE.itemsize), np.int8)
        out[..., :q.shape[-1]] = q.numpy()
        out[..., q.shape[-1]:] = scale.numpy().astype(INT8_SCALE).view(np.int8)
        return out
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.numpy().astype(DTYPES[dtype], copy=False)


def from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy rows → float32 tensor (a fresh buffer, safe to use in autograd)."""
    arr = np.ascontiguousarray(arr)
    if dtype == "int8":  # dequantised here, in the loader worker that gathers the rows
        scale = np.ascontiguousarray(arr[..., -INT8_SCALE.itemsize:]).view(INT8_SCALE)
        return torch.from_numpy(arr[..., :-INT8_SCALE.itemsize].astype(np.float32) * scale)
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


def kind_of(array: str) -> str:
    """The chunk kind an array is stored in (``image``, ``text`` or ``syncap``)."""
    return next(k for k, names in KIND_ARRAYS.items() if array in names)


@dataclass(frozen=True)
class Layout:
    """Where every row of one segment lives: derived from meta.json and the segment's counts, so readers and
    writers agree by construction."""

    root: Path  # the segment's folder
    n_samples: int
    n_captions: int
    chunk_rows: int
    arrays: dict[str, tuple[int, ...]]  # name → trailing shape of one row
    dtype: str

    @classmethod
    def of_segment(cls, folder: Path, meta: dict[str, Any], n_samples: int, n_captions: int) -> Layout:
        chunk_rows, arrays, dtype = layout_settings(folder.parent.parent, meta)
        return cls(folder, int(n_samples), int(n_captions), chunk_rows, arrays, dtype)

    def chunks(self, kind: str | None = None) -> list[Chunk]:
        out = []
        kinds = [("image", self.n_samples), ("text", self.n_captions)]
        if any(a in self.arrays for a in SYNCAP_ARRAYS):  # synthetic captions: one row per sample, as images
            kinds.append(("syncap", self.n_samples))
        for k, n in kinds:
            if kind in (None, k):
                out += [Chunk(k, i, lo, min(lo + self.chunk_rows, n))
                        for i, lo in enumerate(range(0, n, self.chunk_rows))]
        return out

    def arrays_of(self, kind: str) -> list[str]:
        return [a for a in KIND_ARRAYS[kind] if a in self.arrays]

    def shard(self, chunk: Chunk, array: str) -> Path:
        return self.root / f"{chunk.name}.{array}.npy"

    def marker(self, chunk: Chunk) -> Path:
        return self.root / f"{chunk.name}.done.json"

    def shape(self, chunk: Chunk, array: str) -> tuple[int, ...]:
        """The stored shape of one chunk's array (int8 rows are wider: see ``stored_row``)."""
        return (chunk.hi - chunk.lo, *stored_row(self.arrays[array], self.dtype))

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


def commit_chunk(layout: Layout, chunk: Chunk, arrays: dict[str, np.ndarray],
                 extra: dict[str, Any] | None = None) -> None:
    """Write a chunk's shards (each atomically), then its marker (with ``extra``): the marker is the commit."""
    files = {}
    for name, arr in arrays.items():
        expected = layout.shape(chunk, name)
        if arr.shape != expected:
            raise RuntimeError(f"internal error: {chunk.name}.{name} has shape {arr.shape}, expected {expected}")
        write_npy(layout.shard(chunk, name), arr)
        files[name] = {"shape": list(arr.shape), "sha256": array_sha256(arr)}
    write_json(layout.marker(chunk), {"rows": [chunk.lo, chunk.hi], "files": files, **(extra or {})})


STRINGS = "syncaps"  # a synthetic-caption chunk's string table: ``syncap-00000.syncaps.bytes.npy`` / ``.offsets.npy``


def strings_name(chunk: Chunk) -> str:
    return f"{chunk.name}.{STRINGS}"


def read_meta(root: Path) -> dict[str, Any]:
    meta = read_json(root / "meta.json", f"{root} is not a teacher cache (build one with `mmkd cache`)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheError(f"{root / 'meta.json'} is not an mmkd teacher cache's metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{root} is a teacher cache of format version {meta.get('format_version')}, which this mmkd "
                         f"no longer reads (it reads version {FORMAT_VERSION}: segments per data shard): rebuild it "
                         f"with `mmkd cache` into a new --out (or delete {root} first)")
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


def layout_settings(root: Path, meta: dict[str, Any]) -> tuple[int, dict[str, tuple[int, ...]], str]:
    """(chunk rows, array name → trailing row shape, storage dtype) from meta.json, or CacheError naming it."""
    lay = meta["layout"]
    try:
        chunk_rows = int(lay["chunk_rows"])
        arrays = {str(k): tuple(int(x) for x in v) for k, v in lay["arrays"].items()}
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows {chunk_rows}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CacheError(f"{root / 'meta.json'}: its 'layout' is not valid ({type(e).__name__}: {e}; the file is "
                         f"damaged): rebuild the cache (delete {root} and rerun `mmkd cache`)") from None
    return chunk_rows, arrays, meta["fingerprint"]["storage"]["dtype"]


# ------------------------------------------------------------------------------------- segments and their names

SEGMENTS = "segments"
INDEX = "index"
MANIFEST = "manifest.json"
SEGMENT_FILE = "segment.json"  # a segment's index commit (its keys, digests and captions are written)
DONE_FILE = "done.json"  # a segment's commit (every chunk written)
SHARD_STAMP = "shard.json"  # the data shard's name, size and sample count as its index knew them (sharded data)
MEMORY_SHARD = ""  # the shard id of records that come from no data shard (in-memory sources)


def shard_id(shard: str) -> str:
    """A record's data shard as the cache names it: local paths made absolute (the same tar named relatively or
    absolutely is one shard), URLs and ``pipe:`` commands as given, ``""`` for in-memory records."""
    if not shard or "://" in shard or shard.startswith("pipe:"):
        return shard
    return os.path.abspath(os.path.expanduser(shard))


def segment_name(shard: str) -> str:
    """The folder of a shard's segment: its readable file name and a hash of its id (distinct shards with one
    file name, e.g. two datasets' ``train-0000.tar``, get distinct segments)."""
    if shard == MEMORY_SHARD:
        return "memory"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", shard.rstrip("/").rsplit("/", 1)[-1])[:48] or "shard"
    return f"{stem}-{hashlib.sha1(shard.encode()).hexdigest()[:12]}"


def key_hashes(strings: Sequence[str]) -> np.ndarray:
    """64-bit BLAKE2b hashes of strings (little-endian uint64), the same in every process and Python version
    (unlike ``hash()``). Collisions are possible and handled: lookups compare the stored strings."""
    return np.frombuffer(b"".join(hashlib.blake2b(s.encode(), digest_size=8).digest() for s in strings),
                         dtype="<u8").copy() if strings else np.zeros(0, "<u8")


def write_strings(folder: Path, name: str, strings: Sequence[str]) -> None:
    """``name.bytes.npy`` (the UTF-8 bytes, concatenated) and ``name.offsets.npy`` (n + 1 uint64 offsets): a
    string table a reader memory-maps and reads one entry of without loading the rest."""
    data = [s.encode() for s in strings]
    offsets = np.zeros(len(data) + 1, "<u8")
    np.cumsum([len(b) for b in data], out=offsets[1:])
    write_npy(folder / f"{name}.bytes.npy", np.frombuffer(b"".join(data), np.uint8))
    write_npy(folder / f"{name}.offsets.npy", offsets)


class StringTable:
    """A memory-mapped string table written by ``write_strings``: entry i without reading the others."""

    def __init__(self, folder: Path, name: str) -> None:
        self.data = load_npy(folder / f"{name}.bytes.npy")
        self.offsets = load_npy(folder / f"{name}.offsets.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int) -> bytes:
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])].tobytes()

    def __getitem__(self, i: int) -> str:
        return self.raw(i).decode()

    def all(self) -> list[str]:
        return [self[i] for i in range(len(self))]


def load_npy(path: Path) -> np.ndarray:
    """A memory-mapped .npy file (an empty array is read whole: numpy cannot map 0 bytes), or CacheError."""
    try:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # an empty array: nothing to map
            return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CacheError(f"{path} is missing: the teacher cache is damaged; rerun the same `mmkd cache` command "
                         "(or delete the folder to rebuild it)") from None
    except (OSError, EOFError, ValueError) as e:
        raise CacheError(f"{path} is unreadable ({e}): the teacher cache is damaged; delete this segment's folder "
                         "and rerun the same `mmkd cache` command") from None


def read_manifest(root: Path) -> dict[str, Any] | None:
    """manifest.json, or None before the first segment is published."""
    if not (root / MANIFEST).is_file():
        return None
    manifest = read_json(root / MANIFEST, "")
    segs = manifest.get("segments") if isinstance(manifest, dict) else None
    if not isinstance(segs, list) or not all(isinstance(s, dict) and {"name", "shard", "n_samples", "n_captions"}
                                             <= set(s) for s in segs) or "index" not in manifest:
        raise CacheError(f"{root / MANIFEST} does not hold what the cache writes (damaged): rerun the same "
                         "`mmkd cache` command to rewrite it")
    return manifest


INDEX_NAMES = ("meta.json", MANIFEST, "tokenizer", SEGMENTS, INDEX)  # what a cache folder holds
LOCK_NAME = ".lock"  # mmkd.locking.FolderLock's file: one build per folder
