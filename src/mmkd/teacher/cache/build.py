"""Building a teacher cache: run the teacher once over the data (K views per sample), one segment per data
shard, and commit its outputs chunk by chunk, resuming what an interrupted build committed and computing only the
shards a grown dataset added. Pixels are prepared in a thread beside the teacher where that pays, and chunks are
written by a background writer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
from mmkd.locking import FolderLock
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache import synthetic
from mmkd.teacher.cache.folder import check_same_build, prepare_folder, prepare_segment, publish, segment_meta
from mmkd.teacher.cache.format import (
    DONE_FILE,
    DTYPES,
    SEGMENT_FILE,
    SEGMENTS,
    SHARD_STAMP,
    CacheError,
    Chunk,
    Layout,
    commit_chunk,
    read_json_or_none,
    read_manifest,
    segment_name,
    shard_id,
    to_storage,
    write_json,
)
from mmkd.teacher.cache.index import KeyIndex
from mmkd.teacher.cache.meta import cache_meta
from mmkd.teacher.cache.spec import BuildSpec
from mmkd.teacher.targets import teacher_outputs

PUBLISH_EVERY_S = 300.0  # rank 0 rewrites the manifest during a build at most this often
PUBLISH_SHARE = 0.1  # and spends at most about this share of the build's time on it (the index grows with the data)


@dataclass
class BuildResult:
    root: Path
    n_samples: int
    n_captions: int
    views: int
    chunks_built: int  # by this process
    chunks_skipped: int  # already committed (resume, or segments of shards cached before)
    seconds: float
    segments_built: int = 0  # by this process: segments with at least one chunk computed
    segments_skipped: int = 0  # by this process: segments already complete (shards cached before)


def _check_keys(records: Sequence[Record]) -> list[str]:
    keys = [r.key for r in records]
    seen: set[str] = set()
    for r in records:
        if r.key in seen:
            raise DataError(f"sample key {r.key!r} ({r.origin or r.key}) appears more than once; the cache indexes "
                            "samples by key, so keys must be unique across all data given to `mmkd cache`")
        seen.add(r.key)
    return keys


def by_shard(records: Sequence[Record]) -> list[tuple[str, list[Record]]]:
    """The records of each data shard (``shard_id``), shards in the order the data first names them."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(shard_id(r.shard), []).append(r)
    return list(groups.items())


@dataclass
class ShardGroup:
    """One data shard's records, read when the build reaches it (``load``), so a build holds one shard at a time.

    n: its sample count, known without reading it; stamp: what the shard index knows of its tar (name, size, count,
    SHA-256 of its bytes), written beside the segment so that training checks the cache against the data without
    reading sample bytes."""

    shard: str
    n: int
    load: Callable[[], list[Record]]
    stamp: dict[str, Any] | None = None


def _sharded(records: Sequence[Record]) -> bool:
    """Whether records are read on demand from indexed shards (``ShardedRecords``), not held in a list."""
    return hasattr(records, "shard_counts")


def shard_groups(sources: Sequence[Sequence[Record]]) -> list[ShardGroup]:
    """The data shards of ``sources`` in data order: records held in memory grouped at once (as ``by_shard``),
    sharded ones (``ShardedRecords``) one group per shard, read lazily: O(shards) here, never O(samples)."""
    held: dict[str, list[Record]] = {}
    out: list[ShardGroup] = []
    seen: set[str] = set()
    for src in sources:
        if not _sharded(src):
            for shard, recs in by_shard(list(src)):
                if shard not in held:
                    if shard in seen:
                        raise CacheError(f"data shard {shard} is given twice; give each shard once")
                    held[shard] = []
                    seen.add(shard)
                    out.append(ShardGroup(shard, 0, lambda shard=shard: held[shard]))
                held[shard] += recs
            continue
        index, counts = src.index, src.shard_counts  # type: ignore[attr-defined]
        for s, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            shard = shard_id(index.refs[s].name)
            if shard in seen:
                raise CacheError(f"data shard {shard} is given twice; give each shard once")
            seen.add(shard)
            lo = int(index.offsets[s])
            stamp = {"name": index.refs[s].name, "size": int(index.sizes[s]), "count": int(index.counts[s]),
                     "sha256": index.digests[s]}
            out.append(ShardGroup(shard, int(count), lambda lo=lo, n=int(count), src=src: [src[i] for i in
                                                                                      range(lo, lo + n)],
                                  stamp if count == int(index.counts[s]) else None))
    for g in out:
        if g.shard in held:
            g.n = len(held[g.shard])
    return out


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


def build_cache(teacher: DualEncoder, records: Sequence[Record] | Sequence[Sequence[Record]],
                out_dir: str | os.PathLike, spec: BuildSpec | None = None, *, progress: bool = False,
                log: Callable[[str], None] | None = None) -> BuildResult:
    """Run ``teacher`` once over ``records`` (``spec.views`` views each) and their captions, writing a cache to
    ``out_dir`` as ``spec`` says (default: ``BuildSpec()``).

    ``records``: one source (a list, or sharded records read on demand) or a tuple of sources (e.g. paired and
    unpaired). Sharded sources are walked shard by shard, so the build holds one shard's records at a time.
    Records are grouped by data shard (``Record.shard``; in-memory records form one segment): a shard whose
    segment is complete is checked against the data and left untouched, a partial one resumes chunk by chunk, a new
    one is computed, so a grown dataset costs only its new shards. Under torchrun (an initialised process group)
    rank r builds data segments r, r + N, ...; rank 0 publishes the manifest after a barrier, and the call returns
    when all are committed. The teacher's training mode is restored afterwards and its parameters are not modified.
    """
    t0 = time.perf_counter()
    shards = shard_groups(_sources(records))
    spec = (spec or BuildSpec()).resolved(next(teacher.parameters()).device.type)
    meta = cache_meta(teacher, spec)
    root = Path(out_dir)
    rank = mdist.rank()
    stats = {"chunks_built": 0, "chunks_skipped": 0, "segments_built": 0, "segments_skipped": 0, "captions": 0}
    # rank 0 holds the folder for the whole build: a second build fails at once instead of deleting this one's
    # temporary files or racing it at the rename
    with FolderLock(root, "teacher cache folder") if rank == 0 else nullcontext():
        if rank == 0:
            prepare_folder(root, meta, teacher.tokenizer, log)
            if read_manifest(root) is not None or any((root / SEGMENTS).glob(f"*/{DONE_FILE}")):
                publish(root, [segment_name(g.shard) for g in shards])  # segments a killed build finished
        mdist.barrier()
        if rank != 0:
            check_same_build(root, meta)
        _build_segments(teacher, root, meta, spec, shards, stats, progress, log)
        mdist.barrier()
        if rank == 0:
            _publish_final(root, shards)
    return BuildResult(root, sum(g.n for g in shards), stats["captions"], spec.views,
                       stats["chunks_built"], stats["chunks_skipped"], time.perf_counter() - t0,
                       stats["segments_built"], stats["segments_skipped"])


def _sources(records: Sequence[Record] | Sequence[Sequence[Record]]) -> list[Sequence[Record]]:
    """The data sources of ``records`` (a tuple of sources, or one), refused when empty or keys repeat."""
    sources = list(records) if isinstance(records, tuple) else [records]
    if not any(len(src) for src in sources):
        raise CacheError("no records to cache: the data is empty")
    # keys are checked unique here for records in memory; a shard index refused duplicates when it was built, and
    # a key another segment holds is refused as each segment starts
    _check_keys([r for src in sources if not _sharded(src) for r in src])
    return sources


def _build_segments(teacher: DualEncoder, root: Path, meta: dict[str, Any], spec: BuildSpec,
                    shards: list[ShardGroup], stats: dict[str, int], progress: bool,
                    log: Callable[[str], None] | None) -> None:
    """This rank's segments (rank r builds data segments r, r + N, ...), rank 0 publishing now and then."""
    rank, world = mdist.rank(), mdist.world_size()
    cached = _published_keys(root)
    mine = shards[rank::world]
    if log and rank == 0:
        done = sum((root / SEGMENTS / segment_name(g.shard) / DONE_FILE).is_file() for g in shards)
        log(f"teacher cache {root}: {sum(g.n for g in shards)} samples in {len(shards)} data shard(s) × "
            f"{spec.views} view(s), {spec.dtype}, {spec.precision} compute"
            + (f"; {done} shard(s) already cached" if done else "")
            + (f"; ranks split the shards ({world} ranks)" if world > 1 else ""))
    bar = _progress_bar(mine, spec.views, enabled=progress and rank == 0)
    order = [segment_name(g.shard) for g in shards]
    published, publish_s = time.monotonic(), 0.0
    was_training = teacher.training
    teacher.eval()
    try:
        for group in mine:
            _build_segment(teacher, root, meta, spec, group, cached, stats, bar, log if rank == 0 else None)
            # a long build publishes what every rank finished now and then, so training can use it early
            # (data.only_cached_shards) before it ends
            if rank == 0 and time.monotonic() - published >= max(PUBLISH_EVERY_S, publish_s / PUBLISH_SHARE):
                t = time.monotonic()
                publish(root, order)
                published, publish_s = time.monotonic(), time.monotonic() - t
    finally:
        teacher.train(was_training)
        bar.close()


def _publish_final(root: Path, shards: list[ShardGroup]) -> None:
    """The manifest of every segment, once all ranks committed theirs; refused if a rank's segment is missing."""
    manifest = publish(root, [segment_name(g.shard) for g in shards], final=True)
    listed = {s["name"] for s in manifest["segments"]}
    missing = [g.shard or "in memory" for g in shards if segment_name(g.shard) not in listed]
    if missing:
        raise CacheError(f"{root}: the segments of {len(missing)} shard(s) were not written by their ranks "
                         f"(first: {missing[0]}); rerun the same command to complete them")


Published = tuple[KeyIndex, list[dict[str, Any]]] | None


def _published_keys(root: Path) -> Published:
    """The key index of the segments already published (and their list), to refuse a new segment whose keys
    another segment holds."""
    manifest = read_manifest(root)
    if not manifest or not manifest["segments"]:
        return None
    return KeyIndex(root, manifest["index"], "keys"), manifest["segments"]


def _progress_bar(mine: Sequence[ShardGroup], views: int, enabled: bool) -> Any:
    """Images × views up front (known without reading); each segment's captions are added as it is read."""
    from tqdm import tqdm

    total = sum(g.n * views for g in mine)
    return tqdm(total=total, desc="teacher cache", disable=None if enabled else True, leave=False, unit="item")


def _build_segment(teacher: DualEncoder, root: Path, meta: dict[str, Any], spec: BuildSpec, group: ShardGroup,
                   cached: Published, stats: dict[str, int], bar: Any, log: Callable[[str], None] | None) -> None:
    """One data shard's segment: its index (keys, digests, captions), then every chunk not yet committed, then
    its commit. A complete segment is checked and left as it is: not one of its files is written again (but its
    shard stamp, which is not the segment's data, is added when missing)."""
    shard, records = group.shard, group.load()
    folder = root / SEGMENTS / segment_name(shard)
    keys = [r.key for r in records]
    digests = fp.record_digests(records)
    captions = sorted({c for r in records for c in r.captions})
    stats["captions"] += len(captions)
    bar.total += len(captions)
    bar.refresh()
    if cached is not None and not (folder / SEGMENT_FILE).is_file():
        index, segments = cached
        rows = index.rows(keys)
        if (rows >= 0).any():
            i = int(np.argmax(rows >= 0))
            seg = int(np.searchsorted(np.cumsum([s["n_samples"] for s in segments]), rows[i], side="right"))
            raise CacheError(f"sample key {keys[i]!r} of shard {shard or 'in memory'} is already cached in segment "
                             f"{segments[seg]['name']} of {root} (shard {segments[seg]['shard'] or 'in memory'}); "
                             "keys must be unique across the cache. If shards were moved or renamed, build into a "
                             "new --out")
    prepare_segment(folder, segment_meta(shard, keys, digests, captions), keys, digests, captions, log)
    layout = Layout.of_segment(folder, meta, len(keys), len(captions))
    todo = []
    for c in layout.chunks():
        if layout.marker(c).is_file():
            for name in layout.arrays_of(c.kind):
                layout.check_shard(c, name)
        else:
            todo.append(c)
    stats["chunks_skipped"] += len(layout.chunks()) - len(todo)
    skipped = [c for c in layout.chunks() if c not in todo]
    bar.total += sum(c.hi - c.lo for c in layout.chunks("syncap"))
    bar.update(sum((c.hi - c.lo) * (spec.views if c.kind == "image" else 1) for c in skipped))
    if todo:
        _compute(teacher, records, captions, layout, [c for c in todo if c.kind != "syncap"], spec, bar)
        syncaps = [c for c in todo if c.kind == "syncap"]
        if syncaps:
            synthetic.compute(teacher, spec.captioner, spec.sampling, records, layout, syncaps,  # type: ignore[arg-type]
                              seed=spec.seed, features=spec.features, bf16=spec.bf16, batch_size=spec.batch_size,
                              bar=bar)
        stats["chunks_built"] += len(todo)
        stats["segments_built"] += 1
    else:
        stats["segments_skipped"] += 1
    if group.stamp is not None and (read_json_or_none(folder / SHARD_STAMP) != group.stamp):
        write_json(folder / SHARD_STAMP, group.stamp)  # before done.json: a finished segment always has it
    if todo or not (folder / DONE_FILE).is_file():
        write_json(folder / DONE_FILE, {"shard": shard, "chunks": len(layout.chunks())})


def _compute(teacher: DualEncoder, records: list[Record], captions: list[str], layout: Layout, todo: list[Chunk],
             spec: BuildSpec, bar: Any) -> None:
    """Run the teacher over the image and caption chunks ``todo``, committing each chunk in a background writer."""
    tm = teacher.meta
    views, batch_size, features, bf16 = spec.views, spec.batch_size, spec.features, spec.bf16
    bank = ImageBank(records, tm.image_size, tm.image_mean, tm.image_std, augment=True, seed=spec.seed,
                     augmentation=spec.augmentation)

    def jobs() -> Iterator[tuple[Any, Callable[[], Any]]]:
        for c in todo:
            for v in range(views if c.kind == "image" else 1):
                for lo in range(c.lo, c.hi, batch_size):
                    idx = list(range(lo, min(lo + batch_size, c.hi)))
                    if c.kind == "image":
                        yield (c, v, lo, len(idx)), (lambda idx=idx, v=v: bank.pixels(idx, [v] * len(idx)))
                    else:
                        yield (c, 0, lo, len(idx)), (lambda idx=idx: [captions[i] for i in idx])

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
        writer.finish()

