"""What a cache's ``meta.json`` says, parsed once into typed, frozen fields (``CacheInfo``): the reader, the checks,
ensembles and the run setup read these instead of walking the raw dict, so a key is named in one place and a
damaged file is refused when the cache is opened, not at the first lookup that needs the key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.models.dual_encoder import EncoderMeta
from mmkd.teacher.cache.format import layout_settings, read_meta


@dataclass(frozen=True)
class CachedTeacherPrint:
    """``fingerprint.teacher``: the teacher whose answers the cache holds, and what a student needs of it."""

    source: str
    weights_sha256: str
    projection_dim: int
    feature_dims: Mapping[str, int]  # tower → pooled feature width (empty for imported embeddings)
    logit_scale: float  # exp'd, as the online teacher reports it
    logit_bias: float | None  # a SigLIP teacher's; None for others
    meta: Mapping[str, Any]  # the teacher's EncoderMeta as JSON

    @classmethod
    def from_json(cls, t: Mapping[str, Any]) -> CachedTeacherPrint:
        bias = t.get("logit_bias")
        return cls(str(t.get("source") or ""), str(t["weights_sha256"]), int(t["projection_dim"]),
                   {str(k): int(v) for k, v in t["feature_dims"].items()}, float(t["logit_scale"]),
                   None if bias is None else float(bias), dict(t["meta"]))

    def encoder_meta(self) -> EncoderMeta:
        return EncoderMeta.from_json(dict(self.meta))


@dataclass(frozen=True)
class CacheInfo:
    """A cache's ``meta.json``: its fingerprint (teacher, transform, views, storage, captioner, import) and layout.

    ``fingerprint_sha256`` is the SHA-256 of the whole fingerprint as canonical JSON: what a run records to name
    the targets it trained on."""

    root: Path
    teacher: CachedTeacherPrint
    views: int
    view_seed: int
    augmentation: Mapping[str, Any]  # TransformConfig's scale/ratio/hflip... the views were drawn with
    transform_version: int
    decoder: str | None  # the JPEG decoder that made the views (absent in caches built before it was recorded)
    dtype: str  # storage dtype: float32, float16, bfloat16 or int8
    features: bool  # pooled features stored (--features)
    precision: str  # the teacher's compute precision (``imported`` for imported embeddings)
    chunk_rows: int
    arrays: Mapping[str, tuple[int, ...]]  # array name → trailing shape of one row
    captioner: Mapping[str, Any] | None  # synthetic captions' fingerprint (--captioner), None without them
    imported: Mapping[str, Any] | None  # what ``mmkd cache import`` recorded, None for a built cache
    fingerprint_sha256: str

    @classmethod
    def read(cls, root: str | Path) -> CacheInfo:
        """Parse ``root/meta.json``; CacheError naming the file and the missing or invalid key."""
        root = Path(root)
        return cls.from_meta(root, read_meta(root))

    @classmethod
    def from_meta(cls, root: Path, meta: Mapping[str, Any]) -> CacheInfo:
        chunk_rows, arrays, dtype = layout_settings(root, dict(meta))
        f = meta["fingerprint"]
        tf = f["transform"]
        storage = f["storage"]
        return cls(root, CachedTeacherPrint.from_json(f["teacher"]), int(f["views"]), int(tf["view_seed"]),
                   dict(tf["augmentation"]), tf["version"], tf.get("decoder"), dtype, bool(storage.get("features")),
                   str(storage.get("precision", "")), chunk_rows, arrays, f.get("captioner"), f.get("imported"),
                   hashlib.sha256(json.dumps(f, sort_keys=True).encode()).hexdigest())
