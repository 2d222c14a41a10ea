"""Reading a teacher cache: ``CachedTeacher`` answers by sample key, view and caption without running a model,
after ``CacheExpectation`` has checked the cache fits the training that reads it. Keys are found through the
memory-mapped hash index (``index.KeyIndex``), so opening costs no per-key work and a reader copied into a
DataLoader worker opens its own maps there."""

from __future__ import annotations

import mmap
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.data.batches import ImageBank, TrainBatch
from mmkd.data.records import Record
from mmkd.data.transforms import TRANSFORM_VERSION
from mmkd.models.dual_encoder import EncoderMeta
from mmkd.models.student import TeacherInfo
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache.expect import CacheExpectation
from mmkd.teacher.cache.format import (
    DONE_FILE,
    DTYPES,
    SEGMENT_FILE,
    SEGMENTS,
    SHARD_STAMP,
    CacheError,
    CacheFingerprintError,
    Layout,
    StringTable,
    from_storage,
    kind_of,
    read_json_or_none,
    read_manifest,
    read_meta,
    shard_id,
    stored_row,
)
from mmkd.teacher.cache.index import KeyIndex


def open_maps_budget() -> int:
    """How many shard maps a reader keeps open at once: each map holds a file descriptor, so a quarter of the
    process's open-files limit (at least 8), leaving the rest to data loaders, checkpoints and logs. The limit
    itself is left as the user set it: a library does not change process-wide settings."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 16 if soft == resource.RLIM_INFINITY else max(8, soft // 4)


class CachedTeacher:
    """A teacher that answers by sample key, view and caption from a cache folder; it never runs a model.

    Same interface as ``OnlineTeacher``/``TableTeacher``: ``teacher(batch)`` returns ``image_embeds`` (row of
    each sample at its view), ``text_embeds`` (per caption), the pooled features where cached, and the teacher's
    ``logit_scale``. It serves the segments the manifest lists (a partly built cache serves the shards it holds).
    Shards and the key index are memory-mapped on first use in each process, so opening is cheap, memory stays
    small, and a pickled or forked copy (a DataLoader worker) opens its own maps; at most ``max_open_maps``
    array maps (default ``open_maps_budget()``) stay open, the least recently read closed first, so a cache of
    any number of files is read within the process's open-files limit.
    """

    def __init__(self, root: Path, meta: dict[str, Any], manifest: dict[str, Any],
                 max_open_maps: int | None = None) -> None:
        self.root, self.meta, self.manifest = root, meta, manifest
        segs = manifest["segments"]
        self.folders = [root / SEGMENTS / s["name"] for s in segs]
        self.layouts = [Layout.of_segment(f, meta, s["n_samples"], s["n_captions"]) for f, s in zip(self.folders, segs)]
        self.sample_starts = np.concatenate([[0], np.cumsum([s["n_samples"] for s in segs])]).astype(np.int64)
        self.caption_starts = np.concatenate([[0], np.cumsum([s["n_captions"] for s in segs])]).astype(np.int64)
        self.key_index = KeyIndex(root, manifest["index"], "keys")
        self.caption_index = KeyIndex(root, manifest["index"], "captions")
        self.max_open_maps = max(1, max_open_maps or open_maps_budget())
        self._reset_maps()

    def _reset_maps(self) -> None:
        self._pid = os.getpid()
        self._maps: OrderedDict[tuple[int, str, int], np.ndarray] = OrderedDict()  # least recently read first
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its maps and lock: the copy (e.g. in a spawned DataLoader worker) opens its own."""
        state = self.__dict__.copy()
        for name in ("_maps", "_lock", "_pid"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_maps()

    # -- opening and checking
    @classmethod
    def open(cls, path: str | os.PathLike, expect: CacheExpectation | None = None,
             max_open_maps: int | None = None) -> CachedTeacher:
        """Open the segments the manifest lists (each committed, every array of the right size), then
        ``check(expect)``. Reads no key: lookups go through the memory-mapped index."""
        root = Path(path)
        if not root.is_dir():
            raise CacheError(f"teacher cache {root} not found; build it with `mmkd cache --teacher MODEL --data "
                             f"SPEC --out {root}`")
        meta = read_meta(root)
        manifest = read_manifest(root)
        if manifest is None or not manifest["segments"]:
            raise CacheError(f"teacher cache {root} is incomplete: it holds no finished segment yet (an interrupted "
                             "first build); rerun the same `mmkd cache` command to finish it")
        cache = cls(root, meta, manifest, max_open_maps)
        for folder, lay, seg in zip(cache.folders, cache.layouts, manifest["segments"]):
            if not (folder / DONE_FILE).is_file() or not (folder / SEGMENT_FILE).is_file():
                shard = seg["shard"] or "in memory"
                raise CacheError(f"teacher cache {root} is damaged: segment {folder} (shard {shard}) is listed in "
                                 "manifest.json but not complete; rerun the same `mmkd cache` command to finish it")
            missing = [c for c in lay.chunks() if not lay.marker(c).is_file()]
            if missing:
                raise CacheError(f"teacher cache {root} is incomplete: {len(missing)} of {len(lay.chunks())} chunks "
                                 f"of segment {folder.name} are not written (first: {missing[0].name}); rerun the "
                                 "same `mmkd cache` command to finish it")
            for c in lay.chunks():
                for name in lay.arrays_of(c.kind):
                    lay.check_shard(c, name)
        if expect is not None:
            cache.check(expect)
        return cache

    # -- what the cache holds
    @property
    def n_samples(self) -> int:
        return int(self.sample_starts[-1])

    @property
    def n_captions(self) -> int:
        return int(self.caption_starts[-1])

    @property
    def shards(self) -> list[str]:
        """The data shards it holds a segment of, in row order (``""``: the in-memory records' segment)."""
        return [s["shard"] for s in self.manifest["segments"]]

    @property
    def keys(self) -> list[str]:
        """Every sample key in row order (reads the whole key table: for inspection, not for lookups)."""
        return [k for f in self.folders for k in StringTable(f, "keys").all()]

    @property
    def captions(self) -> list[str]:
        """Every cached caption in row order (each segment's, sorted; for inspection, not for lookups)."""
        return [c for f in self.folders for c in StringTable(f, "captions").all()]

    def digest(self, row: int) -> str:
        seg = int(np.searchsorted(self.sample_starts, row, side="right")) - 1
        return StringTable(self.folders[seg], "digests")[row - int(self.sample_starts[seg])]

    def holds_shard(self, record: Record) -> bool:
        """Whether the cache has a segment of ``record``'s data shard."""
        return shard_id(record.shard) in self._shard_set

    @property
    def _shard_set(self) -> set[str]:
        return set(self.shards)

    def restrict(self, records: Sequence[Record]) -> tuple[list[Record], list[str]]:
        """(the records of shards the cache holds, the shards it lacks in data order): training on a partly built
        cache's shards only (``data.only_cached_shards``)."""
        held = self._shard_set
        kept = [r for r in records if shard_id(r.shard) in held]
        lacking = list(dict.fromkeys(r.shard or "(in-memory records)" for r in records
                                     if shard_id(r.shard) not in held))
        return kept, lacking

    def check(self, expect: CacheExpectation) -> None:
        """Refuse, with a message naming what differs, a cache that does not fit ``expect``."""
        f = self.meta["fingerprint"]
        hard: list[str] = []
        soft: list[str] = []
        missing_arrays = [a for a in expect.arrays if a not in self.arrays]
        if missing_arrays:
            features = any(a.endswith("_features") for a in missing_arrays)
            hard.append(f"it holds no {', '.join(missing_arrays)}" + (
                " (it was imported from embeddings computed elsewhere, which hold no pooled features: use "
                "objectives on embeddings, level: embeds)" if features and self.imported else
                " (the imported embeddings had no text_emb/)" if self.imported else
                " (an objective works on pooled features: rebuild the cache with --features)" if features else
                " (the data had no captions when it was built)" if "text_embeds" in missing_arrays else ""))
        if expect.views is not None and expect.views > self.views:
            hard.append(f"training draws views 0..{expect.views - 1} but the cache holds {self.views} view(s): "
                        f"rebuild with --views {expect.views} or set data.views ≤ {self.views}")
        if expect.augment and self.views == 1 and self.imported:
            hard.append("training augments images but the cache was imported from embeddings computed elsewhere, "
                        "which hold view 0 only (the plain image): set data.augment: false")
        elif expect.augment and self.views == 1:
            hard.append("training augments images but the cache holds only view 0 (no augmented views): rebuild "
                        "with --views K (K ≥ 2) or set data.augment: false")
        if expect.embed_dim is not None and expect.embed_dim != self.embed_dim:
            hard.append(f"its embeddings are {self.embed_dim}-wide, expected {expect.embed_dim}")
        for tower, width in (expect.feature_dims or {}).items():
            if self.feature_dims.get(tower) != width:
                hard.append(f"its {tower} features are {self.feature_dims.get(tower)}-wide, expected {width}")
        text = "text_embeds" in expect.arrays or "text_features" in expect.arrays
        if expect.sharded:
            expect = self._check_shards(expect, text, hard, soft)
        if expect.records is not None:
            hard += self._missing(expect, text)
            soft += self._changed(expect.records)
        if expect.view_seed is not None and expect.view_seed != self.view_seed:
            soft.append(f"transform.view_seed: the cache's views were drawn with seed {self.view_seed}, training "
                        f"replays seed {expect.view_seed} (build the student's image banks with CachedTeacher.bank)")
        if expect.augmentation is not None:
            soft += fp.diff(dict(f["transform"]["augmentation"]), dict(expect.augmentation), "transform.augmentation",
                            ("cache", "training"))
        built_by = f["transform"].get("decoder")  # absent in caches built before it was recorded
        if expect.decoder is not None and built_by is not None and expect.decoder != built_by:
            soft.append(f"transform.decoder: the cache's views were decoded by {built_by}, training decodes JPEGs "
                        f"with {expect.decoder} (slightly different pixels): install {built_by} where training runs "
                        "or rebuild the cache there")
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

    def _check_shards(self, expect: CacheExpectation, text: bool, hard: list[str], soft: list[str]
                      ) -> CacheExpectation:
        """Sharded training data against the segments, by the shard index alone: each shard the cache lacks is
        named, each whose size, sample count or content digest (SHA-256 of its bytes: the size alone misses a shard
        rewritten at the same size, tar padding to 10,240-byte records) differs from the stamp its segment recorded
        is a fingerprint difference naming the shard. A stamp without a digest (a cache built before digests were
        recorded) is one too: checking such shards sample by sample would read the whole data at every start,
        while rerunning `mmkd cache` checks them once and records their digests. Shards whose segment has no stamp
        (built from records in a list) or whose stamp differs are read and checked sample by sample as in-memory
        data is (keys present, content digests): the expectation returned holds those records."""
        segments = {s["shard"]: s for s in self.manifest["segments"]}
        fallback: list[Record] = []
        fallback_captioned: list[Record] = []
        lacking: list[str] = []
        changed: list[tuple[str, str, str]] = []  # (shard, its segment, what differs)
        undigested: list[str] = []
        n_shards = 0
        for records, captioned in expect.sharded:
            index, counts = records.index, records.shard_counts  # type: ignore[attr-defined]
            for s, count in enumerate(counts.tolist()):
                if not count:
                    continue
                n_shards += 1
                name = index.refs[s].name
                seg = segments.get(shard_id(name))
                if seg is None:
                    lacking.append(name)
                    continue
                now = {"size": int(index.sizes[s]), "count": int(index.counts[s]), "sha256": index.digests[s]}
                then = read_json_or_none(self.root / SEGMENTS / seg["name"] / SHARD_STAMP)
                if isinstance(then, dict) and {"size", "count"} <= set(then):
                    if (then["size"], then["count"]) != (now["size"], now["count"]):
                        changed.append((name, seg["name"], f"{then['size']} bytes, {then['count']} samples then; "
                                                           f"{now['size']} bytes, {now['count']} samples now"))
                    elif "sha256" not in then:
                        undigested.append(name)
                        continue
                    elif then["sha256"] != now["sha256"]:
                        changed.append((name, seg["name"], f"same size, content SHA-256 {str(then['sha256'])[:12]}… "
                                                           f"then, {now['sha256'][:12]}… now"))
                    else:
                        continue
                # no stamp (built from records in a list), or a changed shard: its samples are checked one by one
                lo = int(index.offsets[s])
                recs = [records[i] for i in range(lo, lo + count)]
                fallback += recs
                if captioned:
                    fallback_captioned += recs
        if lacking:
            hard.append(f"it lacks {len(lacking)} of the training data's {n_shards} shard(s) (it is partly built, or "
                        f"the data grew): {', '.join(map(repr, lacking[:3]))}{' …' if len(lacking) > 3 else ''}; "
                        "cache them with the same `mmkd cache` command over the whole data (it computes only the "
                        "missing shards), or train on the cached shards only with data.only_cached_shards: true")
        if changed:
            soft.append(f"data: {len(changed)} shard(s) changed since the cache was built: "
                        + ", ".join(f"{name!r} ({what})" for name, _, what in changed[:3])
                        + (" …" if len(changed) > 3 else "") + "; rebuild their segments: delete each one's folder "
                        f"(e.g. {self.root / SEGMENTS / changed[0][1]}) and rerun the same `mmkd cache` command (it "
                        "computes only those shards, and names any other changed shard)")
        if undigested:
            soft.append(f"data: the cache records no content digest for {len(undigested)} shard(s) (built by an "
                        f"older mmkd), e.g. {undigested[0]!r}, so a shard rewritten at the same size would go "
                        "unnoticed: rerun the same `mmkd cache` command once (it computes nothing for complete "
                        "shards, checks their samples and records their digests)")
        if not fallback:
            return expect
        from dataclasses import replace

        return replace(expect, records=[*(expect.records or []), *fallback],
                       captioned=[*(expect.captioned or []), *fallback_captioned])

    def _missing(self, expect: CacheExpectation, text: bool) -> list[str]:
        out = []
        records = list(expect.records or [])
        rows = self.key_index.rows([r.key for r in records])
        absent = [r for r, row in zip(records, rows) if row < 0]
        held = self._shard_set
        lacking = list(dict.fromkeys(r.shard or "(in-memory records)" for r in absent
                                     if shard_id(r.shard) not in held))
        if lacking:
            shards = set(r.shard for r in records)
            out.append(f"it lacks {len(lacking)} of the training data's {len(shards)} shard(s) (it is partly built, or "
                       f"the data grew): {', '.join(map(repr, lacking[:3]))}{' …' if len(lacking) > 3 else ''}; "
                       "cache them with the same `mmkd cache` command over the whole data (it computes only the "
                       "missing shards), or train on the cached shards only with data.only_cached_shards: true")
            absent = [r for r in absent if shard_id(r.shard) in held]
        if absent:
            r = absent[0]
            out.append(f"{len(absent)} training sample(s) are not in it, e.g. key {r.key!r}"
                       f"{f' ({r.origin})' if r.origin and r.origin != r.key else ''}: build the cache over the "
                       "same data (mmkd cache --data SPEC, or --config with your run config)")
        if text:
            recs = expect.captioned if expect.captioned is not None else records
            recs = [r for r in recs if shard_id(r.shard) in held]  # a lacking shard's captions are named above
            wanted = sorted({c for r in recs for c in r.captions})
            lost = [c for c, row in zip(wanted, self.caption_index.rows(wanted)) if row < 0]
            if lost:
                out.append(f"{len(lost)} caption(s) are not in it, e.g. {lost[0]!r}")
        return out

    def _changed(self, records: Sequence[Record]) -> list[str]:
        rows = self.key_index.rows([r.key for r in records])
        present = [(r, int(row)) for r, row in zip(records, rows) if row >= 0]
        digests = fp.record_digests([r for r, _ in present])
        changed = []
        tables: dict[int, StringTable] = {}
        for (r, row), d in zip(present, digests):
            seg = int(np.searchsorted(self.sample_starts, row, side="right")) - 1
            table = tables.get(seg) or tables.setdefault(seg, StringTable(self.folders[seg], "digests"))
            then = table[row - int(self.sample_starts[seg])]
            if then != d:
                changed.append((r, then, d))
        if not changed:
            return []
        r, then, d = changed[0]
        return [f"data: {len(changed)} sample(s) differ from when the cache was built, e.g. {r.key!r}"
                f"{f' ({r.origin})' if r.origin and r.origin != r.key else ''}: {then} then, {d} now"]

    @property
    def imported(self) -> dict[str, Any] | None:
        """What ``mmkd cache import`` recorded (source folder, match, what is absent), None for a built cache."""
        return self.meta["fingerprint"].get("imported")

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
        return list(self.layouts[0].arrays)

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
                           tokenizer, source=(f"the imported embeddings {self.root} (no teacher weights)" if
                                              self.imported else f"the cached teacher {self.root}"))

    def bank(self, records: Sequence[Record], image_size: int, mean: Sequence[float], std: Sequence[float],
             augment: bool | None = None, augmentation: Mapping[str, Any] | None = None) -> ImageBank:
        """An image bank at the student's own resolution that replays the cached views (same seed and crops).

        ``augmentation``: training's own settings instead of the cache's (``check`` then compares the two)."""
        return ImageBank(records, image_size, mean, std, augment=self.views > 1 if augment is None else augment,
                         seed=self.view_seed, augmentation=self.augmentation if augmentation is None else augmentation)

    # -- lookups
    def _shard(self, seg: int, chunk: int, array: str) -> np.ndarray:
        if self._pid != os.getpid():  # a forked copy: the parent's maps and lock are not this process's
            self._reset_maps()
        key = (seg, array, chunk)
        with self._lock:
            m = self._maps.get(key)
            if m is not None:
                self._maps.move_to_end(key)
                return m
            lay = self.layouts[seg]
            if array == "syncaps":  # a chunk's synthetic caption table (mmkd.teacher.cache.synthetic)
                from mmkd.teacher.cache.synthetic import strings_name

                m = StringTable(lay.root, strings_name(lay.chunks("syncap")[chunk]))  # type: ignore[assignment]
                self._maps[key] = m
                return m
            c = lay.chunks(kind_of(array))[chunk]
            m = np.load(lay.shard(c, array), mmap_mode="r")
            mm = getattr(m, "_mmap", None)  # rows are read at random: no read-ahead around each one
            if mm is not None and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)
            self._maps[key] = m
            while len(self._maps) > self.max_open_maps:
                # gathers copy rows out, so the least recently read map (and its descriptor) closes once dropped
                self._maps.popitem(last=False)
            return m

    def strings(self, seg: int, chunk: int) -> StringTable:
        """Segment ``seg``'s synthetic caption table of chunk ``chunk`` (kept open with the array maps)."""
        return self._shard(seg, chunk, "syncaps")  # type: ignore[return-value]

    def _gather(self, array: str, rows: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        starts = self.caption_starts if kind_of(array) == "text" else self.sample_starts
        lay0 = self.layouts[0]
        per = lay0.chunk_rows
        seg = np.searchsorted(starts, rows, side="right") - 1
        local = rows - starts[seg]
        cidx, off = local // per, local % per
        out = np.empty((len(rows), stored_row(lay0.arrays[array], lay0.dtype)[-1]), DTYPES[lay0.dtype])
        group = seg * (1 + int(cidx.max(initial=0))) + cidx
        for g in np.unique(group):
            sel = np.nonzero(group == g)[0]
            shard = self._shard(int(seg[sel[0]]), int(cidx[sel[0]]), array)
            out[sel] = shard[off[sel], views[sel]] if views is not None else shard[off[sel]]
        return from_storage(out, lay0.dtype)

    def image_rows(self, keys: Sequence[str]) -> np.ndarray:
        rows = self.key_index.rows(keys)
        if (rows < 0).any():
            absent = int(np.count_nonzero(rows < 0))
            more = f"; {absent} of these {len(keys)} keys are not" if absent > 1 else ""
            raise CacheError(f"sample {keys[int(np.argmax(rows < 0))]!r} is not in the teacher cache {self.root} "
                             f"({self.n_samples} samples{more}); rebuild the cache over the training data")
        return rows

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
        return {a: self._gather(a, rows, v) for a in self.layouts[0].arrays_of("image")}

    def texts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        if not captions:
            return {}
        rows = self.caption_index.rows(captions)
        if (rows < 0).any():
            raise CacheError(f"caption {captions[int(np.argmax(rows < 0))]!r} is not in the teacher cache "
                             f"{self.root}; rebuild the cache over the training data")
        return {a: self._gather(a, rows, None) for a in self.layouts[0].arrays_of("text")}

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        out = self.images(batch.keys, batch.views)
        out.update(self.texts(batch.captions))
        if batch.synthetic is not None:  # the drawn synthetic captions' targets (data.synthetic_captions)
            from mmkd.teacher.cache.synthetic import targets

            n = len(batch.synthetic)
            out.update({f"synthetic_{k}": v for k, v in targets(self, batch.keys[:n], batch.synthetic_idx).items()})
        out["logit_scale"] = torch.tensor(min(self.logit_scale, 100.0))  # clamped as the online teacher's
        bias = self.meta["fingerprint"]["teacher"].get("logit_bias")
        if bias is not None:  # a SigLIP teacher's, with its uncapped scale (as teacher_extras gives them)
            out["logit_bias"] = torch.tensor(float(bias))
            out["sigmoid_logit_scale"] = torch.tensor(self.logit_scale)
        return out
