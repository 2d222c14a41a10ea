"""What a cache build computes and how (``BuildSpec``): one typed, frozen value handed from the command line or the
Python API to ``build_cache``, ``cache_meta`` and each segment's build, instead of settings threaded one by one.
A bad setting is refused when the spec is made, naming the setting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mmkd.data.transforms import AUGMENTATION_FIELDS
from mmkd.teacher.cache.format import DTYPES, PRECISIONS, CacheError
from mmkd.teacher.cache.synthetic import CachedCaptions
from mmkd.teacher.captioner import Captioner, Sampling
from mmkd.teacher.targets import bf16_supported


def resolve_precision(precision: str, device_type: str | None = None) -> str:
    """``auto`` → bf16 where the device computes it fast, else fp32."""
    if precision not in PRECISIONS:
        raise CacheError(f"precision {precision!r} unknown; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device_type) else "fp32"
    return precision


@dataclass(frozen=True)
class BuildSpec:
    """A cache build's settings.

    views: K views per sample (view 0 the plain eval transform, view v > 0 the augmentation drawn from
    (seed, key, v)); dtype: storage dtype; features: also store pooled pre-projection features; augmentation:
    TransformConfig's ``scale``/``ratio``/``hflip`` (default: the training defaults); precision: the teacher's
    compute precision (``auto``: bfloat16 where the CPU/GPU supports it); chunk_rows: rows per committed chunk;
    batch_size: teacher batch; source: how the teacher was named (recorded, never compared); captioner with
    sampling: also store ``sampling.n`` synthetic captions per sample and their text targets."""

    views: int = 1
    dtype: str = "float16"
    features: bool = False
    seed: int = 0
    augmentation: Mapping[str, Any] | None = None
    precision: str = "auto"
    chunk_rows: int = 1024
    batch_size: int = 64
    source: str = ""
    captioner: Captioner | CachedCaptions | None = None
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        if self.views < 1:
            raise CacheError(f"views must be ≥ 1 (view 0 is the plain eval transform), got {self.views}")
        if self.dtype not in DTYPES:
            raise CacheError(f"dtype {self.dtype!r} unknown; valid: {', '.join(DTYPES)}")
        if self.batch_size < 1 or self.chunk_rows < 1:
            raise CacheError(f"batch_size and chunk_rows must be ≥ 1, got {self.batch_size} and {self.chunk_rows}")
        unknown = sorted(set(self.augmentation or {}) - set(AUGMENTATION_FIELDS))
        if unknown:
            raise CacheError(f"augmentation: unknown setting(s) {unknown}; valid: {', '.join(AUGMENTATION_FIELDS)}")
        if self.precision not in PRECISIONS:
            raise CacheError(f"precision {self.precision!r} unknown; valid: {', '.join(PRECISIONS)}")

    def resolved(self, device_type: str | None) -> BuildSpec:
        """This spec with ``precision: auto`` made the precision the teacher computes in on ``device_type``."""
        return replace(self, precision=resolve_precision(self.precision, device_type))

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def synthetic(self) -> bool:
        """Whether the build stores synthetic captions."""
        return self.captioner is not None and self.sampling is not None
