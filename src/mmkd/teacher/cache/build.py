"""Building a teacher cache: run the teacher once over the data (K views per sample) and commit its outputs
chunk by chunk, resuming what an interrupted build committed. Pixels are prepared in a thread beside the
teacher where that pays, and chunks are written by a background writer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd import dist as mdist
from mmkd.data.batches import ImageBank
from mmkd.data.records import DataError, Record
from mmkd.data.transforms import AUGMENTATION_FIELDS, TRANSFORM_VERSION, augmentation_settings
from mmkd.locking import FolderLock
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache.folder import check_same_build, prepare_folder
from mmkd.teacher.cache.format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    PRECISIONS,
    CacheError,
    Chunk,
    Layout,
    array_sha256,
    to_storage,
    write_json,
    write_npy,
)
from mmkd.teacher.targets import bf16_supported, teacher_outputs


def resolve_precision(precision: str, device_type: str | None = None) -> str:
    """``auto`` → bf16 where the device computes it fast, else fp32."""
    if precision not in PRECISIONS:
        raise CacheError(f"precision {precision!r} unknown; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device_type) else "fp32"
    return precision


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



def prefetch_pays(device: str) -> bool:
    """Whether preparing pixels in a thread beside the teacher helps: with the teacher on an accelerator, or with a
    core that torch's threads leave free. On a CPU whose every core runs the teacher's matmuls, a second thread
    only preempts them (``bench/cache_build.py`` measures it; the README's benchmark section has the figures)."""
    return device != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()


class Prefetcher:
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
        write_npy(layout.shard(chunk, name), arr)
        files[name] = {"shape": list(arr.shape), "sha256": array_sha256(arr)}
    write_json(layout.marker(chunk), {"rows": [chunk.lo, chunk.hi], "files": files})


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
            prepare_folder(root, meta, keys, digests, captions, teacher.tokenizer, log)
        mdist.barrier()
        if rank != 0:
            check_same_build(root, meta)
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
    prefetch = Prefetcher(jobs(), threaded=prefetch_pays(next(teacher.parameters()).device.type))
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

