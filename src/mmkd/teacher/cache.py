"""The teacher cache: per-sample, per-view teacher embeddings computed once, then read by key during training.

Why: a teacher forward pass per training step costs several times the student's own step (S3). Running the
teacher once and reading its answers by sample key makes every later training and sweep cost the student alone.
Unlike per-class means, the cache stores each sample's own embedding for K views: view 0 is the plain eval
transform, view v > 0 the augmentation that is a pure function of (seed, key, v) (``transforms.view_rng``), so
the student replays exactly the augmented image whose teacher embedding it reads.

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
import mmap
import os
import queue
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.data.records import DataError, Record
from mmkd.data.transforms import AUGMENTATION_FIELDS, TRANSFORM_VERSION, augmentation_settings
from mmkd.errors import MmkdError
from mmkd.fileio import atomic_write, atomic_write_json
from mmkd.locking import FolderLock
from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
from mmkd.models.student import TeacherInfo
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.targets import bf16_supported, teacher_outputs
from mmkd.train import distributed as mdist
from mmkd.train.batches import ImageBank, TrainBatch, TrainData

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


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=1)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.lib.format.write_array(f, arr, allow_pickle=False))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path} not found: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); the cache folder is damaged: rebuild it "
                         "(delete the folder and rerun `mmkd cache`)") from None


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


def resolve_precision(precision: str, device_type: str | None = None) -> str:
    """``auto`` → bf16 where the device computes it fast, else fp32."""
    if precision not in PRECISIONS:
        raise CacheError(f"precision {precision!r} unknown; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device_type) else "fp32"
    return precision


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


def raise_open_files_limit() -> None:
    """Shards are memory-mapped lazily and each map holds a descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            pass


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
    meta = _read_json(root / "meta.json", f"{root} is not a teacher cache (build one with `mmkd cache`)")
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


# -------------------------------------------------------------------------------------------------- building


@dataclass
class BuildResult:
    root: Path
    n_samples: int
    n_captions: int
    views: int
    chunks_built: int  # by this process
    chunks_skipped: int  # already committed (resume)
    seconds: float


def _check_keys(records: Sequence[Record]) -> list[str]:
    keys = [r.key for r in records]
    seen: set[str] = set()
    for r in records:
        if r.key in seen:
            raise DataError(f"sample key {r.key!r} ({r.origin or r.key}) appears more than once; the cache indexes "
                            "samples by key, so keys must be unique across all data given to `mmkd cache`")
        seen.add(r.key)
    return keys


def cache_meta(teacher: DualEncoder, records: Sequence[Record], captions: Sequence[str], *, views: int,
               dtype: str, features: bool, seed: int, augmentation: Mapping[str, Any] | None, precision: str,
               chunk_rows: int, source: str = "", digests: Sequence[str] | None = None) -> dict[str, Any]:
    """meta.json of the cache these arguments build: the fingerprint and the layout."""
    bank = ImageBank([], teacher.meta.image_size, teacher.meta.image_mean, teacher.meta.image_std, True, seed,
                     augmentation)
    identity = fp.teacher_identity(teacher, source)
    digests = list(digests) if digests is not None else fp.record_digests(records)
    dim, fdims = identity["projection_dim"], identity["feature_dims"]
    arrays: dict[str, list[int]] = {"image_embeds": [views, dim]}
    if features:
        arrays["image_features"] = [views, fdims["image"]]
    if captions:
        arrays["text_embeds"] = [dim]
        if features:
            arrays["text_features"] = [fdims["text"]]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": {
            "teacher": identity,
            "data": {"n_samples": len(records), "sha256": fp.data_sha256((r.key for r in records), digests),
                     "n_captions": len(captions), "captions_sha256": fp.captions_sha256(captions),
                     "file_digest": "size"},
            "transform": {"image_size": teacher.meta.image_size, "image_mean": list(teacher.meta.image_mean),
                          "image_std": list(teacher.meta.image_std),
                          "augmentation": augmentation_settings(bank.train_tf.cfg), "view_seed": int(seed),
                          "version": TRANSFORM_VERSION},
            "views": int(views),
            "storage": {"dtype": dtype, "features": bool(features), "precision": precision},
        },
        "layout": {"n_samples": len(records), "n_captions": len(captions), "chunk_rows": int(chunk_rows),
                   "arrays": arrays, "numpy_dtype": DTYPES[dtype].str},
    }


INDEX_NAMES = ("meta.json", "keys.json", "captions.json", "tokenizer", "shards")  # what a cache folder holds
LOCK_NAME = ".lock"  # mmkd.locking.FolderLock's file: one build per folder


def _committed(root: Path) -> bool:
    """Whether any chunk of the folder is committed (its done.json written): then it holds work worth keeping."""
    return (root / "shards").is_dir() and any((root / "shards").glob("*.done.json"))


def _clear_unfinished(root: Path) -> None:
    """Remove what a build that committed no chunk left (index files, uncommitted shards); never other files."""
    for name in INDEX_NAMES:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for tmp in root.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _prepare(root: Path, meta: dict[str, Any], keys: list[str], digests: list[str], captions: list[str],
             tokenizer: Any, log: Callable[[str], None] | None = None) -> None:
    """Create the cache's index (meta.json last: its commit), or check that an existing cache is of this build.

    Called with the folder's lock held. A folder whose first build committed no chunk (it failed or was killed
    early, e.g. on bad data) is started over, so the corrected rerun is not refused as "other settings".
    """
    if (root / "meta.json").is_file():
        try:
            _check_same_build(root, meta)
        except CacheError as e:
            if _committed(root):
                raise
            if log:
                log(f"{root}: starting over: its earlier build wrote no chunk, and was for other settings ({e})")
            _clear_unfinished(root)
        else:
            for tmp in (root / "shards").glob(".*.tmp-*"):  # leftovers of a killed writer; the lock says no one writes
                tmp.unlink(missing_ok=True)
            return
    if root.exists() and not root.is_dir():
        raise CacheError(f"{root} exists and is a file, not a teacher cache folder; choose another --out")
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in INDEX_NAMES and p.name != LOCK_NAME and ".tmp-" not in p.name)
    if foreign:
        raise CacheError(f"{root} exists and is not an mmkd teacher cache (no meta.json; it holds {foreign[:3]}); "
                         "choose another --out or delete it")
    _clear_unfinished(root)  # an earlier build killed before its meta.json: nothing of it was committed
    (root / "shards").mkdir(parents=True)
    _write_json(root / "keys.json", {"keys": keys, "digests": digests})
    _write_json(root / "captions.json", captions)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(root / "tokenizer"))
    _write_json(root / "meta.json", meta)  # last, atomically: a folder with meta.json has its complete index


def _check_same_build(root: Path, meta: dict[str, Any]) -> None:
    found = read_meta(root)
    names = ("this build", "the folder")
    # teacher.source is how the teacher was named (a relative or an absolute path, a hub id): its identity is the
    # weights', tokenizer's and config's hashes, so the same teacher named another way resumes the build
    mine, theirs = (dict(m["fingerprint"], teacher={k: v for k, v in m["fingerprint"]["teacher"].items()
                                                     if k != "source"}) for m in (meta, found))
    differences = (fp.diff(mine, theirs, names=names) + fp.diff(meta["layout"], found["layout"], "layout", names))
    if differences:
        raise CacheError(f"{root} already holds a teacher cache built with other settings, so it cannot be resumed "
                         f"or completed: {'; '.join(differences[:6])}"
                         f"{f' (and {len(differences) - 6} more)' if len(differences) > 6 else ''}. Use another "
                         "--out, or delete the folder to rebuild it")


def prefetch_pays(device: str) -> bool:
    """Whether preparing pixels in a thread beside the teacher helps: with the teacher on an accelerator, or with a
    core that torch's threads leave free. On a CPU whose every core runs the teacher's matmuls, a second thread
    only preempts them (`bench/cache_build.py`; the figures are in the README's teacher cache benchmarks)."""
    return device != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()


class _Prefetcher:
    """Prepares the next pixel batch in a thread while the teacher runs (torch and PIL release the GIL), or
    inline when ``threaded`` is false."""

    def __init__(self, jobs: Iterator[tuple[Any, Callable[[], Any]]], depth: int = 2, threaded: bool = True) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._jobs = jobs
        self._stop = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, daemon=True, name="mmkd-cache-prefetch")
            self._thread.start()

    def _run(self) -> None:
        try:
            for tag, make in self._jobs:
                if self._stop:
                    return
                self._q.put((tag, make(), None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._q.put((None, None, e))
            return
        self._q.put((None, None, StopIteration()))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self._thread is None:
            for tag, make in self._jobs:
                yield tag, make()
            return
        while True:
            tag, value, err = self._q.get()
            if isinstance(err, StopIteration):
                return
            if err is not None:
                raise err
            yield tag, value

    def close(self) -> None:
        self._stop = True
        while self._thread is not None and self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass


class _Writer:
    """Commits chunks in a background thread (at most ``depth`` pending), surfacing its errors to the caller."""

    def __init__(self, layout: Layout, depth: int = 2) -> None:
        self.layout = layout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmkd-cache-writer")
        self._pending: list[Future] = []
        self._failed = False
        self.depth = depth

    def _commit(self, chunk: Chunk, arrays: dict[str, np.ndarray]) -> None:
        if self._failed:  # stop at the first failure, as a killed process would
            return
        try:
            commit_chunk(self.layout, chunk, arrays)
        except BaseException:
            self._failed = True
            raise

    def submit(self, chunk: Chunk, arrays: dict[str, np.ndarray]) -> None:
        self._pending.append(self._pool.submit(self._commit, chunk, arrays))
        while len(self._pending) > self.depth:
            self._pending.pop(0).result()

    def finish(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            self._pool.shutdown(wait=True)


def commit_chunk(layout: Layout, chunk: Chunk, arrays: dict[str, np.ndarray]) -> None:
    """Write a chunk's shards (each atomically), then its marker: the marker is the commit."""
    files = {}
    for name, arr in arrays.items():
        expected = layout.shape(chunk, name)
        if arr.shape != expected:
            raise RuntimeError(f"internal error: {chunk.name}.{name} has shape {arr.shape}, expected {expected}")
        _write_npy(layout.shard(chunk, name), arr)
        files[name] = {"shape": list(arr.shape), "sha256": _sha256(arr)}
    _write_json(layout.marker(chunk), {"rows": [chunk.lo, chunk.hi], "files": files})


def build_cache(
    teacher: DualEncoder,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    *,
    views: int = 1,
    dtype: str = "float16",
    features: bool = False,
    seed: int = 0,
    augmentation: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    chunk_rows: int = 1024,
    precision: str = "auto",
    source: str = "",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Run ``teacher`` once over ``records`` (K views each) and their captions, writing a cache to ``out_dir``.

    Resumes a partial cache built with the same arguments; under torchrun (an initialised process group) every
    rank builds its share of the chunks and the call returns when all are committed. ``augmentation`` holds
    TransformConfig's ``scale``/``ratio``/``hflip`` (default: the training defaults); ``precision`` is the
    teacher's compute precision (``auto``: bfloat16 where the CPU/GPU supports it). The teacher's training
    mode is restored afterwards and its parameters are not modified.
    """
    t0 = time.perf_counter()
    if views < 1:
        raise CacheError(f"views must be ≥ 1 (view 0 is the plain eval transform), got {views}")
    if dtype not in DTYPES:
        raise CacheError(f"dtype {dtype!r} unknown; valid: {', '.join(DTYPES)}")
    if batch_size < 1 or chunk_rows < 1:
        raise CacheError(f"batch_size and chunk_rows must be ≥ 1, got {batch_size} and {chunk_rows}")
    unknown = sorted(set(augmentation or {}) - set(AUGMENTATION_FIELDS))
    if unknown:
        raise CacheError(f"augmentation: unknown setting(s) {unknown}; valid: {', '.join(AUGMENTATION_FIELDS)}")
    if not records:
        raise CacheError("no records to cache: the data is empty")
    records = list(records)
    keys = _check_keys(records)
    digests = fp.record_digests(records)
    captions = sorted({c for r in records for c in r.captions})
    prec = resolve_precision(precision, next(teacher.parameters()).device.type)
    meta = cache_meta(teacher, records, captions, views=views, dtype=dtype, features=features, seed=seed,
                      augmentation=augmentation, precision=prec, chunk_rows=chunk_rows, source=source,
                      digests=digests)
    root = Path(out_dir)
    rank, world = mdist.rank(), mdist.world_size()
    # rank 0 holds the folder for the whole build: a second build fails at once instead of deleting this one's
    # temporary shards or racing it at the rename
    with FolderLock(root, "teacher cache folder") if rank == 0 else nullcontext():
        if rank == 0:
            _prepare(root, meta, keys, digests, captions, teacher.tokenizer, log)
        mdist.barrier()
        if rank != 0:
            _check_same_build(root, meta)
        layout = Layout.from_meta(root, meta)
        mine = [c for g, c in enumerate(layout.chunks()) if g % world == rank]
        todo = []
        for c in mine:
            if layout.marker(c).is_file():
                for name in layout.arrays_of(c.kind):
                    layout.check_shard(c, name)
            else:
                todo.append(c)
        if log and rank == 0:
            done = len(mine) - len(todo)
            log(f"teacher cache {root}: {len(records)} samples × {views} view(s), {len(captions)} captions, "
                f"{dtype}, {prec} compute"
                + (f"; resuming ({done} of {len(mine)} chunks already written)" if done else ""))
        if todo:
            _compute(teacher, records, captions, layout, todo, views=views, seed=seed, augmentation=augmentation,
                     features=features, bf16=prec == "bf16", batch_size=batch_size, progress=progress and rank == 0)
        mdist.barrier()
        if rank == 0:
            missing = [c.name for c in layout.chunks() if not layout.marker(c).is_file()]
            if missing:
                raise CacheError(f"{root}: chunks {missing[:5]} were not written by their ranks; rerun to complete")
    return BuildResult(root, len(records), len(captions), views, len(todo), len(mine) - len(todo),
                       time.perf_counter() - t0)


def _compute(teacher: DualEncoder, records: list[Record], captions: list[str], layout: Layout, todo: list[Chunk],
             *, views: int, seed: int, augmentation: Mapping[str, Any] | None, features: bool, bf16: bool,
             batch_size: int, progress: bool) -> None:
    from tqdm import tqdm

    tm = teacher.meta
    bank = ImageBank(records, tm.image_size, tm.image_mean, tm.image_std, augment=True, seed=seed,
                     augmentation=augmentation)

    def jobs() -> Iterator[tuple[Any, Callable[[], Any]]]:
        for c in todo:
            for v in range(views if c.kind == "image" else 1):
                for lo in range(c.lo, c.hi, batch_size):
                    idx = list(range(lo, min(lo + batch_size, c.hi)))
                    if c.kind == "image":
                        yield (c, v, lo, len(idx)), (lambda idx=idx, v=v: bank.pixels(idx, [v] * len(idx)))
                    else:
                        yield (c, 0, lo, len(idx)), (lambda idx=idx: [captions[i] for i in idx])

    total = sum((c.hi - c.lo) * (views if c.kind == "image" else 1) for c in todo)
    bar = tqdm(total=total, desc="teacher cache", disable=not progress, leave=False, unit="item")
    was_training = teacher.training
    teacher.eval()
    writer = _Writer(layout)
    prefetch = _Prefetcher(jobs(), threaded=prefetch_pays(next(teacher.parameters()).device.type))
    current: Chunk | None = None
    buffers: dict[str, np.ndarray] = {}
    try:
        for (chunk, v, lo, n), inputs in prefetch:
            if chunk is not current:
                if current is not None:
                    writer.submit(current, buffers)
                current = chunk
                buffers = {a: np.empty(layout.shape(chunk, a), DTYPES[layout.dtype])
                           for a in layout.arrays_of(chunk.kind)}
            if chunk.kind == "image":
                out = teacher_outputs(teacher, inputs, None, bf16=bf16, features=features)
                for a in buffers:
                    buffers[a][lo - chunk.lo:lo - chunk.lo + n, v] = to_storage(out[a], layout.dtype)
            else:
                out = teacher_outputs(teacher, None, inputs, bf16=bf16, features=features)
                for a in buffers:
                    buffers[a][lo - chunk.lo:lo - chunk.lo + n] = to_storage(out[a], layout.dtype)
            bar.update(n)
        if current is not None:
            writer.submit(current, buffers)
    finally:
        prefetch.close()
        try:
            writer.finish()
        finally:
            bar.close()
            teacher.train(was_training)


# --------------------------------------------------------------------------------------------------- reading


@dataclass
class CacheExpectation:
    """What a consumer needs of a cache; ``CachedTeacher.check`` refuses a cache that does not provide it.

    Fingerprint parts (overridable with ``ignore_fingerprint``): every record's content digest, the view seed,
    the augmentation settings and the transform version (they decide which crop view v is), and the teacher's
    weights hash. Hard requirements (never overridable): every key and caption present, the arrays, the views,
    and the embedding/feature widths.
    """

    records: Sequence[Record] | None = None
    captioned: Sequence[Record] | None = None  # records whose captions need text targets (default: records)
    view_seed: int | None = None
    augmentation: Mapping[str, Any] | None = None
    views: int | None = None  # views training draws from [0, views)
    augment: bool | None = None  # training uses views > 0
    arrays: Sequence[str] = ("image_embeds",)
    embed_dim: int | None = None
    feature_dims: Mapping[str, int] | None = None
    teacher_sha256: str | None = None
    ignore_fingerprint: bool = False

    @classmethod
    def for_data(cls, data: TrainData, arrays: Sequence[str] = ("image_embeds", "text_embeds"),
                 **kw: Any) -> CacheExpectation:
        """What training on ``data`` needs: its samples, its captions, its views and its banks' augmentation."""
        banks = [b for b in (data.paired, data.unpaired) if b is not None]
        # a bank that does not augment always reads view 0 (the plain transform): its seed and crops never matter
        augmenting = [b for b in banks if b.augment]
        for b in augmenting[1:]:
            if (b.seed, b.train_tf.cfg) != (augmenting[0].seed, augmenting[0].train_tf.cfg):
                raise CacheError("the paired and unpaired image banks use different view seeds or augmentation; "
                                 "build both with CachedTeacher.bank so they replay the cached views")
        ref = augmenting[0] if augmenting else None
        return cls(records=[r for b in banks for r in b.records], captioned=data.paired.records,
                   view_seed=ref.seed if ref else None,
                   augmentation=augmentation_settings(ref.train_tf.cfg) if ref else None,
                   views=data.views, augment=bool(augmenting), arrays=tuple(arrays), **kw)


def arrays_needed(objectives: Any) -> tuple[str, ...]:
    """Teacher arrays the objectives read: embeddings always, pooled features where an objective works on them."""
    out = ["image_embeds", "text_embeds"]
    for o in getattr(objectives, "objectives", []):
        if getattr(o, "teacher_features", False) or getattr(o, "level", "embeds") == "features":
            out += [f"{t}_features" for t in getattr(o, "towers", ["image", "text"])]
    return tuple(dict.fromkeys(out))


class CachedTeacher:
    """A teacher that answers by sample key, view and caption from a cache folder; it never runs a model.

    Same interface as ``OnlineTeacher``/``TableTeacher``: ``teacher(batch)`` returns ``image_embeds`` (row of
    each sample at its view), ``text_embeds`` (per caption), the pooled features where cached, and the teacher's
    ``logit_scale``. Shards are memory-mapped on first use, so opening is cheap and memory stays small.
    """

    def __init__(self, root: Path, meta: dict[str, Any], keys: list[str], digests: list[str],
                 captions: list[str]) -> None:
        self.root, self.meta = root, meta
        self.layout = Layout.from_meta(root, meta)
        self.keys, self.digests, self.captions = keys, digests, captions
        self.row = {k: i for i, k in enumerate(keys)}
        self.caption_row = {c: i for i, c in enumerate(captions)}
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._lock = threading.Lock()

    # -- opening and checking
    @classmethod
    def open(cls, path: str | os.PathLike, expect: CacheExpectation | None = None) -> CachedTeacher:
        """Open a complete cache (every chunk committed, every shard of the right size), then ``check(expect)``."""
        root = Path(path)
        if not root.is_dir():
            raise CacheError(f"teacher cache {root} not found; build it with `mmkd cache --teacher MODEL --data "
                             f"SPEC --out {root}`")
        meta = read_meta(root)
        index = _read_json(root / "keys.json", "the cache's sample index is missing: rebuild the cache")
        captions = _read_json(root / "captions.json", "the cache's caption index is missing: rebuild the cache")
        keys, digests = (index.get("keys"), index.get("digests")) if isinstance(index, dict) else (None, None)
        layout = Layout.from_meta(root, meta)
        if (not isinstance(keys, list) or not isinstance(digests, list) or len(keys) != layout.n_samples
                or len(digests) != len(keys) or not isinstance(captions, list)
                or len(captions) != layout.n_captions):
            raise CacheError(f"{root}: keys.json/captions.json do not match meta.json (damaged cache): rebuild it")
        missing = [c for c in layout.chunks() if not layout.marker(c).is_file()]
        if missing:
            total = len(layout.chunks())
            raise CacheError(f"teacher cache {root} is incomplete: {len(missing)} of {total} chunks are not written "
                             f"(first: {missing[0].name}); rerun the same `mmkd cache` command to finish it")
        for c in layout.chunks():
            for name in layout.arrays_of(c.kind):
                layout.check_shard(c, name)
        raise_open_files_limit()
        cache = cls(root, meta, keys, digests, captions)
        if expect is not None:
            cache.check(expect)
        return cache

    def check(self, expect: CacheExpectation) -> None:
        """Refuse, with a message naming what differs, a cache that does not fit ``expect``."""
        f = self.meta["fingerprint"]
        hard: list[str] = []
        soft: list[str] = []
        missing_arrays = [a for a in expect.arrays if a not in self.layout.arrays]
        if missing_arrays:
            features = any(a.endswith("_features") for a in missing_arrays)
            hard.append(f"it holds no {', '.join(missing_arrays)}" + (
                " (an objective works on pooled features: rebuild the cache with --features)" if features else
                " (the data had no captions when it was built)" if "text_embeds" in missing_arrays else ""))
        if expect.views is not None and expect.views > self.views:
            hard.append(f"training draws views 0..{expect.views - 1} but the cache holds {self.views} view(s): "
                        f"rebuild with --views {expect.views} or set data.views ≤ {self.views}")
        if expect.augment and self.views == 1:
            hard.append("training augments images but the cache holds only view 0 (no augmented views): rebuild "
                        "with --views K (K ≥ 2) or set data.augment: false")
        if expect.embed_dim is not None and expect.embed_dim != self.embed_dim:
            hard.append(f"its embeddings are {self.embed_dim}-wide, expected {expect.embed_dim}")
        for tower, width in (expect.feature_dims or {}).items():
            if self.feature_dims.get(tower) != width:
                hard.append(f"its {tower} features are {self.feature_dims.get(tower)}-wide, expected {width}")
        if expect.records is not None:
            hard += self._missing(expect, "text_embeds" in expect.arrays or "text_features" in expect.arrays)
            soft += self._changed(expect.records)
        if expect.view_seed is not None and expect.view_seed != self.view_seed:
            soft.append(f"transform.view_seed: the cache's views were drawn with seed {self.view_seed}, training "
                        f"replays seed {expect.view_seed} (build the student's image banks with CachedTeacher.bank)")
        if expect.augmentation is not None:
            soft += fp.diff(dict(f["transform"]["augmentation"]), dict(expect.augmentation), "transform.augmentation",
                            ("cache", "training"))
        if f["transform"]["version"] != TRANSFORM_VERSION:
            soft.append(f"transform.version: the cache's views come from transform version "
                        f"{f['transform']['version']}, this mmkd makes version {TRANSFORM_VERSION}")
        if expect.teacher_sha256 is not None and expect.teacher_sha256 != f["teacher"]["weights_sha256"]:
            soft.append("teacher.weights_sha256: the cache was built by a teacher with other weights")
        if hard:
            raise CacheError(f"teacher cache {self.root} cannot serve this training: " + "; ".join(hard))
        if soft and not expect.ignore_fingerprint:
            raise CacheFingerprintError(
                f"teacher cache {self.root} was built for other data or transforms: {'; '.join(soft[:6])}"
                f"{f' (and {len(soft) - 6} more)' if len(soft) > 6 else ''}. Rebuild the cache with `mmkd cache`, or "
                "if you are sure the targets still fit, set train.ignore_cache_fingerprint: true "
                "(CLI: --ignore-fingerprint)")

    def _missing(self, expect: CacheExpectation, text: bool) -> list[str]:
        out = []
        absent = [r for r in expect.records or [] if r.key not in self.row]
        if absent:
            r = absent[0]
            out.append(f"{len(absent)} training sample(s) are not in it, e.g. key {r.key!r}"
                       f"{f' ({r.origin})' if r.origin and r.origin != r.key else ''}: build the cache over the "
                       "same data (mmkd cache --data SPEC, or --config with your run config)")
        if text:
            recs = expect.captioned if expect.captioned is not None else expect.records or []
            lost = sorted({c for r in recs for c in r.captions if c not in self.caption_row})
            if lost:
                out.append(f"{len(lost)} caption(s) are not in it, e.g. {lost[0]!r}")
        return out

    def _changed(self, records: Sequence[Record]) -> list[str]:
        present = [r for r in records if r.key in self.row]
        digests = fp.record_digests(present)
        changed = [(r, d) for r, d in zip(present, digests) if self.digests[self.row[r.key]] != d]
        if not changed:
            return []
        r, d = changed[0]
        return [f"data: {len(changed)} sample(s) differ from when the cache was built, e.g. {r.key!r}"
                f"{f' ({r.origin})' if r.origin and r.origin != r.key else ''}: "
                f"{self.digests[self.row[r.key]]} then, {d} now"]

    # -- what the cache holds
    @property
    def views(self) -> int:
        return int(self.meta["fingerprint"]["views"])

    @property
    def view_seed(self) -> int:
        return int(self.meta["fingerprint"]["transform"]["view_seed"])

    @property
    def augmentation(self) -> dict[str, Any]:
        return dict(self.meta["fingerprint"]["transform"]["augmentation"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["fingerprint"]["teacher"]["projection_dim"])

    @property
    def feature_dims(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.meta["fingerprint"]["teacher"]["feature_dims"].items()}

    @property
    def arrays(self) -> list[str]:
        return list(self.layout.arrays)

    @property
    def logit_scale(self) -> float:
        """The teacher's temperature scale (exp'd), as the online teacher reports it."""
        return float(self.meta["fingerprint"]["teacher"]["logit_scale"])

    @property
    def weights_sha256(self) -> str:
        return str(self.meta["fingerprint"]["teacher"]["weights_sha256"])

    def teacher_info(self) -> TeacherInfo:
        """The teacher's settings and tokenizer, to build a student without loading the teacher."""
        t = self.meta["fingerprint"]["teacher"]
        tokenizer = None
        if (self.root / "tokenizer").is_dir():
            from mmkd.models.hub import load_tokenizer

            tokenizer = load_tokenizer(self.root / "tokenizer", where=f"the teacher cache {self.root}")
        return TeacherInfo(EncoderMeta.from_json(t["meta"]), int(t["projection_dim"]), float(t["logit_scale"]),
                           tokenizer, source=f"the cached teacher {self.root}")

    def bank(self, records: Sequence[Record], image_size: int, mean: Sequence[float], std: Sequence[float],
             augment: bool | None = None) -> ImageBank:
        """An image bank at the student's own resolution that replays the cached views (same seed and crops)."""
        return ImageBank(records, image_size, mean, std, augment=self.views > 1 if augment is None else augment,
                         seed=self.view_seed, augmentation=self.augmentation)

    # -- lookups
    def _shard(self, chunk: int, array: str) -> np.ndarray:
        m = self._maps.get((chunk, array))
        if m is None:
            with self._lock:
                m = self._maps.get((chunk, array))
                if m is None:
                    kind = "image" if array in IMAGE_ARRAYS else "text"
                    c = self.layout.chunks(kind)[chunk]
                    m = np.load(self.layout.shard(c, array), mmap_mode="r")
                    mm = getattr(m, "_mmap", None)  # rows are read at random: no read-ahead around each one
                    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
                        mm.madvise(mmap.MADV_RANDOM)
                    self._maps[(chunk, array)] = m
        return m

    def _gather(self, array: str, rows: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        per = self.layout.chunk_rows
        cidx, off = rows // per, rows % per
        out = np.empty((len(rows), self.layout.arrays[array][-1]), DTYPES[self.layout.dtype])
        for c in np.unique(cidx):
            sel = np.nonzero(cidx == c)[0]
            shard = self._shard(int(c), array)
            out[sel] = shard[off[sel], views[sel]] if views is not None else shard[off[sel]]
        return from_storage(out, self.layout.dtype)

    def image_rows(self, keys: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self.row[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as e:
            raise CacheError(f"sample {e.args[0]!r} is not in the teacher cache {self.root} ({len(self.row)} "
                             "samples); rebuild the cache over the training data") from None

    def images(self, keys: Sequence[str], views: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Image targets of ``keys`` at ``views`` (default view 0)."""
        rows = self.image_rows(keys)
        v = np.zeros(len(rows), np.int64) if views is None else np.asarray(views, dtype=np.int64)
        if len(v) != len(rows):
            raise ValueError(f"{len(rows)} keys but {len(v)} views")
        if len(v) and (v.min() < 0 or v.max() >= self.views):
            bad = int(v[(v < 0) | (v >= self.views)][0])
            raise CacheError(f"view {bad} is not in the teacher cache {self.root}, which holds views "
                             f"0..{self.views - 1}; rebuild it with --views {bad + 1} or draw fewer views")
        return {a: self._gather(a, rows, v) for a in self.layout.arrays_of("image")}

    def texts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        if not captions:
            return {}
        try:
            rows = np.fromiter((self.caption_row[c] for c in captions), dtype=np.int64, count=len(captions))
        except KeyError as e:
            raise CacheError(f"caption {e.args[0]!r} is not in the teacher cache {self.root}; rebuild the cache "
                             "over the training data") from None
        return {a: self._gather(a, rows, None) for a in self.layout.arrays_of("text")}

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        out = self.images(batch.keys, batch.views)
        out.update(self.texts(batch.captions))
        out["logit_scale"] = torch.tensor(min(self.logit_scale, 100.0))  # clamped as the online teacher's
        return out


# -------------------------------------------------------------------------------------------------- verifying


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
        index = _read_json(root / "keys.json", "the sample index is missing")
        captions = _read_json(root / "captions.json", "the caption index is missing")
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
            m = _read_json(marker, "")
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
            if _sha256(arr) != m["files"][a]["sha256"]:
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
