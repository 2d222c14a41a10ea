"""Image transforms on PIL/numpy (no torchvision), with augmentation that is a pure function of its inputs.

Why pure: the teacher cache stores embeddings per (sample key, view), so view v of sample k must be
the same pixels in every epoch, worker and resumed run. `view_rng` derives the generator from
(seed, key, view) with a stable hash; view 0 is always the plain eval transform.

Speed: resize + crop are fused into one PIL ``resize(box=...)`` call (no intermediate image), and the
uint8 → normalised float32 conversion is one numpy pass into a fresh buffer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmkd.config import RandAugmentConfig
from mmkd.data.decode import Box, Decodable
from mmkd.data.randaugment import randaugment

ImageLike = Image.Image | np.ndarray

# Bump when the pixels a (seed, key, view) maps to change (crop sampling, resampling filter, view_rng, decoding), so
# teacher caches built by an older version are refused instead of silently mismatching the student's views.
# 2: JPEGs are decoded with DCT-domain downscaling to the smallest n/8 factor that keeps the crop box at least
#    the output size (mmkd.data.decode), before the same bicubic resize.
# (RandAugment draws after the crop and flip, so settings without it keep version 2's pixels.)
TRANSFORM_VERSION = 2
AUGMENTATION_FIELDS = ("scale", "ratio", "hflip", "randaugment")


@dataclass(frozen=True)
class TransformConfig:
    """Everything that defines the pixels a model sees; mean/std must be the model's own."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool = False  # random resized crop (+ optional flip) when True
    scale: tuple[float, float] = (0.6, 1.0)  # crop area range as a fraction of the image
    hflip: bool = False  # off by default: captions say "left"/"right"!
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect-ratio range
    randaugment: RandAugmentConfig | None = None  # train only, after crop and flip (a mapping is converted)

    def __post_init__(self) -> None:
        if isinstance(self.randaugment, Mapping):  # as a cache's meta.json or a YAML file hold it
            object.__setattr__(self, "randaugment", randaugment_config(self.randaugment))
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std need 3 values with std > 0, got {self.mean} / {self.std}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")


# -------------------------------------------------------------------------------------- single transforms


def to_pil(image: ImageLike) -> Image.Image:
    """RGB PIL image from a PIL image of any mode or an HxWx3 / HxW uint8 array."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"image array must be HxWx3 (or HxW) uint8, got {arr.shape} {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def center_box(width: int, height: int) -> Box:
    """Source box that resize-shorter-side + centre-crop maps to the output: the central square."""
    m = min(width, height)
    left, top = (width - m) / 2, (height - m) / 2
    return (left, top, left + m, top + m)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> Box:
    """A random box covering `scale` of the area with aspect ratio in `ratio` (log-uniform).

    Falls back to the largest centred box with a legal ratio when 10 tries do not fit.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def crop_resize(image: Image.Image, box: Box, size: int) -> Image.Image:
    """Crop `box` and resize it to size x size in one bicubic resample (no intermediate copy)."""
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def hflip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_normalized_tensor(image: ImageLike, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 HxWx3 → float32 [3,H,W] of (x/255 - mean)/std, in one pass into a new buffer."""
    return _normalize(np.asarray(image), *_affine(mean, std))


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(x/255 - mean)/std as x*scale + offset, shaped to broadcast over [3,H,W]."""
    m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return (1.0 / (255.0 * s)).reshape(3, 1, 1), (-m / s).reshape(3, 1, 1)


def _normalize(arr: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    np.multiply(arr.transpose(2, 0, 1), scale, out=out)
    out += offset
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------- the model transform


class ImageTransform:
    """Eval: resize shorter side + centre crop; train: random resized crop (+ optional flip); normalise.

    Output is float32 [3, image_size, image_size]. Train mode with ``rng=None`` draws from a fresh,
    unseeded generator; pass `view_rng(...)` for reproducible views.
    """

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg
        self._scale, self._offset = _affine(cfg.mean, cfg.std)

    def __repr__(self) -> str:
        return f"ImageTransform({self.cfg})"

    def __call__(self, image: ImageLike | Decodable, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The normalised view: `view` then `normalize` (see `view`)."""
        return _normalize(self.view(image, rng), self._scale, self._offset)

    def view(self, image: ImageLike | Decodable, rng: np.random.Generator | None = None) -> np.ndarray:
        """The view's uint8 HxWx3 pixels, not yet normalised (what DataLoader workers ship: 4x fewer bytes).

        ``image`` may be still encoded (a ``Decodable``): the crop box is drawn from its header's size, then
        it is decoded only as large as that box needs (JPEG's DCT-domain scaling) before the exact resize."""
        cfg, size = self.cfg, self.cfg.image_size
        if (not cfg.train and isinstance(image, np.ndarray) and image.dtype == np.uint8
                and image.shape == (size, size, 3)):
            return image  # already model-sized: skip PIL entirely
        encoded = not isinstance(image, (Image.Image, np.ndarray))
        img = None if encoded else to_pil(image)
        w, h = image.size if encoded else img.size  # type: ignore[union-attr]
        flip = False
        if cfg.train:
            rng = rng if rng is not None else np.random.default_rng()
            box = random_resized_crop_box(w, h, cfg.scale, cfg.ratio, rng)
            flip = cfg.hflip and rng.random() < 0.5
        elif (w, h) != (size, size):
            box = center_box(w, h)
        else:
            box = None
        if encoded:
            img, box = image.decode(box, size)  # type: ignore[union-attr]
        if box is not None:
            img = crop_resize(img, box, size)
        if flip:
            img = hflip(img)
        if cfg.train and cfg.randaugment is not None:
            img = randaugment(img, cfg.randaugment, rng)  # type: ignore[arg-type]
        return np.asarray(img)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] (on any device) → float32 (x/255 - mean)/std, computed exactly as `__call__`
        computes it (x * scale, then + offset, both in float32), so the floats are the same bits either way."""
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
        out.copy_(pixels)  # exact: every uint8 is a float32; in place, twice as fast as a mixed-dtype multiply
        out.mul_(torch.from_numpy(self._scale).to(pixels.device))
        return out.add_(torch.from_numpy(self._offset).to(pixels.device))


def augmentation_settings(cfg: TransformConfig) -> dict[str, object]:
    """The settings that decide which crop view v is (image size, mean and std only decide its resolution).

    ``randaugment`` is present only when it is on, so the settings of a cache built without it (before it
    existed, too) still equal those of training without it."""
    out: dict[str, object] = {"scale": list(cfg.scale), "ratio": list(cfg.ratio), "hflip": bool(cfg.hflip)}
    if cfg.randaugment is not None:
        out["randaugment"] = dataclasses.asdict(cfg.randaugment)
    return out


def randaugment_config(settings: Mapping[str, object]) -> RandAugmentConfig:
    """A RandAugmentConfig from its settings mapping; ValueError naming an unknown or bad key."""
    fields = [f.name for f in dataclasses.fields(RandAugmentConfig)]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"randaugment: unknown setting(s) {unknown}; valid: {', '.join(fields)}")
    try:
        return RandAugmentConfig(**settings)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"randaugment: {e}") from None


def with_randaugment(augmentation: Mapping[str, object] | None, cfg: RandAugmentConfig | None
                     ) -> dict[str, object]:
    """``augmentation`` (crop settings) with RandAugment set to ``cfg``, or removed where ``cfg`` is None."""
    out = {k: v for k, v in (augmentation or {}).items() if k != "randaugment"}
    if cfg is not None:
        out["randaugment"] = dataclasses.asdict(cfg)
    return out


def with_crop_scale(augmentation: Mapping[str, object] | None, scale: Sequence[float] | None) -> dict[str, object]:
    """``augmentation`` with its crop's area range set to ``scale`` (data.crop_scale), or kept where that is None
    (so a cache's own range, or TransformConfig's default, applies)."""
    out = dict(augmentation or {})
    if scale is not None:
        out["scale"] = [float(x) for x in scale]
    return out


def _key_hash(key: str) -> int:
    """64-bit hash of a sample key that is the same in every process (unlike salted ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """Generator for augmentation view `view` of sample `key`: a pure function of (seed, key, view)."""
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, _key_hash(key), view])


def apply_view(transform_train: ImageTransform, transform_eval: ImageTransform, image: ImageLike | Decodable,
               seed: int, key: str, view: int) -> torch.Tensor:
    """View 0 = the deterministic eval transform; view v > 0 = train transform seeded by (seed, key, v)."""
    if view == 0:
        return transform_eval(image)
    return transform_train(image, rng=view_rng(seed, key, view))


def apply_view_pixels(transform_train: ImageTransform, transform_eval: ImageTransform, image: ImageLike | Decodable,
                      seed: int, key: str, view: int) -> np.ndarray:
    """`apply_view`'s uint8 HxWx3 pixels, before normalisation."""
    if view == 0:
        return transform_eval.view(image)
    return transform_train.view(image, rng=view_rng(seed, key, view))
