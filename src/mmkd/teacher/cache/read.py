"""Reading a teacher cache: ``CachedTeacher`` answers by sample key, view and caption without running a model,
after ``CacheExpectation`` has checked the cache fits the training that reads it."""

from __future__ import annotations

import mmap
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.data.batches import ImageBank, TrainBatch, TrainData
from mmkd.data.records import Record
from mmkd.data.transforms import TRANSFORM_VERSION, augmentation_settings
from mmkd.models.dual_encoder import EncoderMeta
from mmkd.models.student import TeacherInfo
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache.format import (
    DTYPES,
    IMAGE_ARRAYS,
    CacheError,
    CacheFingerprintError,
    Layout,
    from_storage,
    read_json,
    read_meta,
)


def open_maps_budget() -> int:
    """How many shard maps a reader keeps open at once: each map holds a file descriptor, so a quarter of the
    process's open-files limit (at least 8), leaving the rest to data loaders, checkpoints and logs. The limit
    itself is left as the user set it: a library does not change process-wide settings."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 16 if soft == resource.RLIM_INFINITY else max(8, soft // 4)


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
    ``logit_scale``. Shards are memory-mapped on first use, so opening is cheap and memory stays small; at most
    ``max_open_maps`` maps (default ``open_maps_budget()``) stay open, the least recently read closed first, so a
    cache of any number of shards is read within the process's open-files limit.
    """

    def __init__(self, root: Path, meta: dict[str, Any], keys: list[str], digests: list[str],
                 captions: list[str], max_open_maps: int | None = None) -> None:
        self.root, self.meta = root, meta
        self.layout = Layout.from_meta(root, meta)
        self.keys, self.digests, self.captions = keys, digests, captions
        self.row = {k: i for i, k in enumerate(keys)}
        self.caption_row = {c: i for i, c in enumerate(captions)}
        self.max_open_maps = max(1, max_open_maps or open_maps_budget())
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()  # least recently read first
        self._lock = threading.Lock()

    # -- opening and checking
    @classmethod
    def open(cls, path: str | os.PathLike, expect: CacheExpectation | None = None,
             max_open_maps: int | None = None) -> CachedTeacher:
        """Open a complete cache (every chunk committed, every shard of the right size), then ``check(expect)``."""
        root = Path(path)
        if not root.is_dir():
            raise CacheError(f"teacher cache {root} not found; build it with `mmkd cache --teacher MODEL --data "
                             f"SPEC --out {root}`")
        meta = read_meta(root)
        index = read_json(root / "keys.json", "the cache's sample index is missing: rebuild the cache")
        captions = read_json(root / "captions.json", "the cache's caption index is missing: rebuild the cache")
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
        cache = cls(root, meta, keys, digests, captions, max_open_maps)
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
        key = (chunk, array)
        with self._lock:
            m = self._maps.get(key)
            if m is not None:
                self._maps.move_to_end(key)
                return m
            kind = "image" if array in IMAGE_ARRAYS else "text"
            c = self.layout.chunks(kind)[chunk]
            m = np.load(self.layout.shard(c, array), mmap_mode="r")
            mm = getattr(m, "_mmap", None)  # rows are read at random: no read-ahead around each one
            if mm is not None and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)
            self._maps[key] = m
            while len(self._maps) > self.max_open_maps:
                # gathers copy rows out, so the least recently read map (and its descriptor) closes once dropped
                self._maps.popitem(last=False)
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

