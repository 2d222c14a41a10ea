"""A teacher read from a cache: ``CachedTeacher`` answers a training batch by sample key, view and caption without
running a model. It is a ``reader.CacheReader`` (maps and lookups) opened after ``checks`` found the cache whole,
with what training needs besides rows: the check against a ``CacheExpectation``, the teacher's settings for
building a student, and image banks that replay the cached views."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmkd.data.batches import ImageBank, TrainBatch
from mmkd.data.records import Record
from mmkd.models.student import TeacherInfo
from mmkd.teacher.cache import checks
from mmkd.teacher.cache.expect import CacheExpectation
from mmkd.teacher.cache.format import CacheError, read_manifest
from mmkd.teacher.cache.info import CacheInfo
from mmkd.teacher.cache.reader import CacheReader


class CachedTeacher(CacheReader):
    """A teacher that answers by sample key, view and caption from a cache folder; it never runs a model.

    Same interface as ``OnlineTeacher``/``TableTeacher``: ``teacher(batch)`` returns ``image_embeds`` (row of
    each sample at its view), ``text_embeds`` (per caption), the pooled features where cached, and the teacher's
    ``logit_scale``. It serves the segments the manifest lists (a partly built cache serves the shards it holds);
    ``info`` is its parsed ``meta.json``.
    """

    @classmethod
    def open(cls, path: str | os.PathLike, expect: CacheExpectation | None = None,
             max_open_maps: int | None = None) -> CachedTeacher:
        """Open the segments the manifest lists (each committed, every array of the right size), then
        ``check(expect)``. Reads no key: lookups go through the memory-mapped index."""
        root = Path(path)
        if not root.is_dir():
            raise CacheError(f"teacher cache {root} not found; build it with `mmkd cache --teacher MODEL --data "
                             f"SPEC --out {root}`")
        info = CacheInfo.read(root)
        manifest = read_manifest(root)
        if manifest is None or not manifest["segments"]:
            raise CacheError(f"teacher cache {root} is incomplete: it holds no finished segment yet (an interrupted "
                             "first build); rerun the same `mmkd cache` command to finish it")
        cache = cls(root, info, manifest, max_open_maps)
        checks.check_segments(cache)
        if expect is not None:
            cache.check(expect)
        return cache

    def check(self, expect: CacheExpectation) -> None:
        """Refuse, with a message naming what differs, a cache that does not fit ``expect`` (``checks.check``)."""
        checks.check(self, expect)

    def restrict(self, records: Sequence[Record]) -> tuple[list[Record], list[str]]:
        """(the records of shards the cache holds, the shards it lacks in data order): training on a partly built
        cache's shards only (``data.only_cached_shards``)."""
        return checks.restrict(self, records)

    # -- the teacher's settings (``info``), as an online teacher gives them
    @property
    def imported(self) -> Mapping[str, Any] | None:
        """What ``mmkd cache import`` recorded (source folder, match, what is absent), None for a built cache."""
        return self.info.imported

    @property
    def views(self) -> int:
        return self.info.views

    @property
    def view_seed(self) -> int:
        return self.info.view_seed

    @property
    def augmentation(self) -> dict[str, Any]:
        return dict(self.info.augmentation)

    @property
    def embed_dim(self) -> int:
        return self.info.teacher.projection_dim

    @property
    def feature_dims(self) -> dict[str, int]:
        return dict(self.info.teacher.feature_dims)

    @property
    def logit_scale(self) -> float:
        """The teacher's temperature scale (exp'd), as the online teacher reports it."""
        return self.info.teacher.logit_scale

    def teacher_info(self) -> TeacherInfo:
        """The teacher's settings and tokenizer, to build a student without loading the teacher."""
        t = self.info.teacher
        tokenizer = None
        if (self.root / "tokenizer").is_dir():
            from mmkd.models.hub import load_tokenizer  # loads transformers: only where a tokenizer is needed

            tokenizer = load_tokenizer(self.root / "tokenizer", where=f"the teacher cache {self.root}")
        return TeacherInfo(t.encoder_meta(), t.projection_dim, t.logit_scale, tokenizer,
                           source=(f"the imported embeddings {self.root} (no teacher weights)" if
                                   self.imported else f"the cached teacher {self.root}"))

    def bank(self, records: Sequence[Record], image_size: int, mean: Sequence[float], std: Sequence[float],
             augment: bool | None = None, augmentation: Mapping[str, Any] | None = None) -> ImageBank:
        """An image bank at the student's own resolution that replays the cached views (same seed and crops).

        ``augmentation``: training's own settings instead of the cache's (``check`` then compares the two)."""
        return ImageBank(records, image_size, mean, std, augment=self.views > 1 if augment is None else augment,
                         seed=self.view_seed, augmentation=self.augmentation if augmentation is None else augmentation)

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        out = self.images(batch.keys, batch.views)
        out.update(self.texts(batch.captions))
        if batch.synthetic is not None:  # the drawn synthetic captions' targets (data.synthetic_captions)
            n = len(batch.synthetic)
            out.update({f"synthetic_{k}": v for k, v in self.synthetic_texts(batch.keys[:n],
                                                                              batch.synthetic_idx).items()})
        out["logit_scale"] = torch.tensor(min(self.logit_scale, 100.0))  # clamped as the online teacher's
        bias = self.info.teacher.logit_bias
        if bias is not None:  # a SigLIP teacher's, with its uncapped scale (as teacher_extras gives them)
            out["logit_bias"] = torch.tensor(float(bias))
            out["sigmoid_logit_scale"] = torch.tensor(self.logit_scale)
        return out
