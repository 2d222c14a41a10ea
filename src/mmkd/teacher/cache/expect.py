"""What a consumer of a teacher cache needs of it (``CacheExpectation``: samples, captions, views, arrays, widths,
fingerprints), stated once from the training data and objectives, so ``CachedTeacher.check`` can refuse a cache
that does not provide it before any step runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmkd.data.batches import TrainData
from mmkd.data.decode import jpeg_decoder
from mmkd.data.records import Record
from mmkd.data.transforms import augmentation_settings
from mmkd.teacher.cache.format import CacheError


@dataclass
class CacheExpectation:
    """What a consumer needs of a cache; ``CachedTeacher.check`` refuses a cache that does not provide it.

    Fingerprint parts (overridable with ``ignore_fingerprint``): every record's content digest (for sharded data:
    each shard's name, size and sample count as its index knows them), the view seed, the augmentation settings,
    the transform version and the JPEG decoder (they decide view v's pixels), and the teacher's weights hash.
    Hard requirements (never overridable): every key and caption present, the arrays, the views,
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
    # sharded sources (``ShardedRecords``), checked shard by shard against the segments' shard stamps, reading no
    # sample; (records, captioned) per source
    sharded: Sequence[tuple[Sequence[Record], bool]] = ()
    decoder: str | None = None  # the JPEG decoder that makes training's views (``mmkd.data.decode``)

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
        held = [b for b in banks if not hasattr(b.records, "shard_counts")]
        sharded = [(b.records, b is data.paired) for b in banks if hasattr(b.records, "shard_counts")]
        return cls(records=[r for b in held for r in b.records],
                   captioned=data.paired.records if data.paired in held else [], sharded=sharded,
                   decoder=jpeg_decoder().name,
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
