"""RandAugment (Cubuk et al., 2020) on PIL images, drawn from a view's own generator so a view stays replayable.

Why here and not torchvision: mmkd's views must be a pure function of (seed, key, view, transform version) so the
teacher cache can store the embedding of exactly the pixels the student later sees; torchvision draws from torch's
global generator (and its CPU build does not match our torch). The op list and the magnitude ranges are
torchvision's ``RandAugment._augmentation_space`` (the reference implementation of the paper).

Magnitudes at bin b of B (m = b / (B - 1)); "±" ops take a random sign:

- Identity: nothing.
- ShearX / ShearY: ± 0.3·m shear factor, x += s·y (y += s·x) about the top-left corner.
- TranslateX / TranslateY: ± int(150/331 · width (height) · m) pixels (at most 45% of the side).
- Rotate: ± 30·m degrees about the centre (counter-clockwise for +).
- Brightness / Color / Contrast / Sharpness: PIL ``ImageEnhance`` with factor 1 ± 0.9·m.
- Posterize: keep the top 8 − round(4·m) bits of each channel.
- Solarize: invert the pixels ≥ 255·(1 − m) (at m = 0 that is pure white only).
- AutoContrast: stretch each channel to 0..255; Equalize: equalise each channel's histogram.

Each of ``num_ops`` steps draws an op uniformly (with replacement) and a sign (a fair coin, drawn for every op so
each step consumes the same two draws), then applies it at the configured bin. Geometric ops resample with
nearest neighbour (torchvision's default) and fill the uncovered area with ``FILL``, mid grey. They move what a
caption describes: "top left" can end up elsewhere after a shear, translate or rotate (up to 45% of the side, 30
degrees), as it can after a random crop; colour ops never move anything but can make colour words less true
(Solarize, Posterize, Color at -0.9 nearly greyscale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mmkd.config import RandAugmentConfig
from mmkd.registry import Registry

FILL = (128, 128, 128)  # what geometric ops leave where no source pixel lands: mid grey, not black
TRANSLATE_FRACTION = 150.0 / 331.0  # torchvision's: 150 pixels of a 331-pixel image at the top bin


@dataclass(frozen=True)
class Op:
    """One RandAugment operation: ``apply(image, magnitude)``, the magnitude at the top bin for a ``w × h`` image
    (``top``; None for ops without one), and whether a random sign applies."""

    apply: Callable[[Image.Image, float], Image.Image]
    top: Callable[[int, int], float] | None = None
    signed: bool = False
    levels: Callable[[float], float] | None = None  # bin fraction m in [0, 1] → magnitude (default: m · top)

    def magnitude(self, fraction: float, width: int, height: int) -> float:
        if self.levels is not None:
            return self.levels(fraction)
        return 0.0 if self.top is None else fraction * self.top(width, height)


OPS: Registry[Op] = Registry("RandAugment op")
# torchvision's order: the op index drawn from a view's generator maps through this tuple, so it must never change
# without a TRANSFORM_VERSION bump
ORDER = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
         "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")


def _affine(img: Image.Image, data: tuple[float, ...]) -> Image.Image:
    """PIL's affine: output pixel (x, y) takes the input at (a·x + b·y + c, d·x + e·y + f)."""
    return img.transform(img.size, Image.Transform.AFFINE, data, resample=Image.Resampling.NEAREST, fillcolor=FILL)


def _enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda img, m: kind(img).enhance(1.0 + m)


OPS.register("Identity")(Op(lambda img, m: img))
OPS.register("ShearX")(Op(lambda img, m: _affine(img, (1.0, m, 0.0, 0.0, 1.0, 0.0)), lambda w, h: 0.3, True))
OPS.register("ShearY")(Op(lambda img, m: _affine(img, (1.0, 0.0, 0.0, m, 1.0, 0.0)), lambda w, h: 0.3, True))
OPS.register("TranslateX")(Op(lambda img, m: _affine(img, (1.0, 0.0, -int(m), 0.0, 1.0, 0.0)),
                              lambda w, h: TRANSLATE_FRACTION * w, True))
OPS.register("TranslateY")(Op(lambda img, m: _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, -int(m))),
                              lambda w, h: TRANSLATE_FRACTION * h, True))
OPS.register("Rotate")(Op(lambda img, m: img.rotate(m, resample=Image.Resampling.NEAREST, fillcolor=FILL),
                          lambda w, h: 30.0, True))
OPS.register("Brightness")(Op(_enhance(ImageEnhance.Brightness), lambda w, h: 0.9, True))
OPS.register("Color")(Op(_enhance(ImageEnhance.Color), lambda w, h: 0.9, True))
OPS.register("Contrast")(Op(_enhance(ImageEnhance.Contrast), lambda w, h: 0.9, True))
OPS.register("Sharpness")(Op(_enhance(ImageEnhance.Sharpness), lambda w, h: 0.9, True))
OPS.register("Posterize")(Op(lambda img, m: ImageOps.posterize(img, int(m)),
                             levels=lambda f: float(8 - int(np.round(4.0 * f)))))
OPS.register("Solarize")(Op(lambda img, m: ImageOps.solarize(img, m), levels=lambda f: 255.0 * (1.0 - f)))
OPS.register("AutoContrast")(Op(lambda img, m: ImageOps.autocontrast(img)))
OPS.register("Equalize")(Op(lambda img, m: ImageOps.equalize(img)))


def magnitude_of(name: str, cfg: RandAugmentConfig, width: int, height: int) -> float:
    """Op ``name``'s unsigned magnitude at ``cfg``'s bin for a ``width × height`` image."""
    return OPS.get(name).magnitude(cfg.magnitude / (cfg.num_magnitude_bins - 1), width, height)


def draw_ops(cfg: RandAugmentConfig, rng: np.random.Generator, width: int, height: int) -> list[tuple[str, float]]:
    """The ``num_ops`` (op, signed magnitude) steps of one view, drawn from its generator: two draws per step."""
    steps = []
    for _ in range(cfg.num_ops):
        name = ORDER[int(rng.integers(len(ORDER)))]
        negative = bool(rng.integers(2))
        m = magnitude_of(name, cfg, width, height)
        steps.append((name, -m if negative and OPS.get(name).signed else m))
    return steps


def apply_op(img: Image.Image, name: str, magnitude: float) -> Image.Image:
    """Op ``name`` at ``magnitude`` (signed, as ``draw_ops`` gives it) on an RGB image."""
    return OPS.get(name).apply(img, magnitude)


def randaugment(img: Image.Image, cfg: RandAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """``cfg.num_ops`` RandAugment steps drawn from ``rng``, applied in turn (the image keeps its size)."""
    for name, m in draw_ops(cfg, rng, *img.size):
        img = apply_op(img, name, m)
    return img
