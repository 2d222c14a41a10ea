"""JPEG decoding at the smallest size a view needs, through the fastest decoder at hand.

Why: decoding JPEG is the CPU bottleneck of CLIP-style training. libjpeg-turbo can downscale inside the inverse
DCT (by n/8, n = 1..8), so a 224-px crop of a 640-px photo need not be decoded at full size: the view's exact
bicubic resize then starts from fewer pixels. The factor is the smallest that keeps the view's crop box at least
as large as the output on both sides, so a view never loses resolution it would have had.

Decoders (a registry, fastest first): ``simplejpeg`` (libjpeg-turbo, every n/8 factor) and ``pil`` (PIL's
``draft``, which offers only 1/2, 1/4 and 1/8). Which one runs is the caller's choice or the first importable one;
the pixels of a view depend on it only through the factor (measured on coco-mini: identical at the factors both
offer). Anything that is not a plain YCbCr/grayscale JPEG (PNG, WebP, CMYK JPEG, …) is PIL's, at full size.
``bench/loader_throughput.py`` holds the side-by-side measurements that chose this.
"""

from __future__ import annotations

import importlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from mmkd.registry import Registry

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels
JPEG_MODES = ("RGB", "L")  # PIL's modes of the JPEGs a fast decoder turns into RGB exactly as PIL does


class Decodable(Protocol):
    """An image known by its header (full-resolution ``size``) whose pixels are decoded on demand."""

    @property
    def size(self) -> tuple[int, int]: ...

    def decode(self, box: Box | None = None, out: int = 0) -> tuple[Image.Image, Box]:
        """RGB pixels at a size where ``box`` still spans ≥ ``out`` pixels, and ``box`` in their coordinates."""
        ...


@dataclass(frozen=True)
class JpegDecoder:
    """A JPEG decoder: ``factors`` it can scale by (ascending, ending with 1.0), ``decode(data, opened, factor)``
    returning RGB pixels at ``factor`` (``opened``: PIL's image of the same bytes, header read, not yet loaded)."""

    name: str
    factors: tuple[float, ...]
    decode: Callable[[bytes, Image.Image, float], Image.Image]


# A factory per decoder: None when its library is not installed.
DECODERS: Registry[Callable[[], JpegDecoder | None]] = Registry("JPEG decoder")
PREFERENCE = ("simplejpeg", "pil")  # fastest first, by bench/results/loader_throughput.json


def _import(module: str) -> object | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


@DECODERS.register("simplejpeg")
def _simplejpeg() -> JpegDecoder | None:
    sj = _import("simplejpeg")
    if sj is None:
        return None

    def decode(data: bytes, opened: Image.Image, factor: float) -> Image.Image:
        w, h = opened.size
        ow, oh = math.ceil(w * factor), math.ceil(h * factor)
        # simplejpeg picks the largest downscale whose output is at least min_width × min_height: that is `factor`
        arr = sj.decode_jpeg(data, "RGB", min_width=ow, min_height=oh)  # type: ignore[attr-defined]
        if arr.shape[:2] != (oh, ow):  # an image under 8 px, too small for n/8 steps to differ: PIL decodes it
            raise ValueError(f"decoded {arr.shape[1]}×{arr.shape[0]}, not the {ow}×{oh} asked for")
        return Image.fromarray(arr)

    return JpegDecoder("simplejpeg", tuple(n / 8 for n in range(1, 9)), decode)


@DECODERS.register("pil")
def _pil() -> JpegDecoder:
    def decode(data: bytes, opened: Image.Image, factor: float) -> Image.Image:
        if factor < 1.0:
            s = round(1 / factor)
            w, h = opened.size
            opened.draft("RGB", (w // s, h // s))  # w // (w // s) >= s, so PIL's own rule picks exactly 1/s
        opened.load()
        return opened if opened.mode == "RGB" else opened.convert("RGB")

    return JpegDecoder("pil", (1 / 8, 1 / 4, 1 / 2, 1.0), decode)


def jpeg_decoder(name: str | None = None) -> JpegDecoder:
    """The decoder called ``name``, or the fastest installed one; a named one that is not installed is an error."""
    if name is not None:
        dec = DECODERS.get(name)()
        if dec is None:
            raise ImportError(f"JPEG decoder {name!r} needs the {name} package: pip install {name}")
        return dec
    for candidate in PREFERENCE:
        dec = DECODERS.get(candidate)()
        if dec is not None:
            return dec
    raise AssertionError("the pil decoder is always available")  # pragma: no cover


def scale_factor(box: Box, out: int, factors: tuple[float, ...]) -> float:
    """The smallest of ``factors`` at which ``box`` still spans at least ``out`` pixels each way (1.0 if none)."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    if out <= 0:
        return 1.0
    for f in factors:
        if bw * f >= out and bh * f >= out:
            return f
    return 1.0


def decode_rgb(data: bytes, box: Box | None = None, out: int = 0,
               decoder: JpegDecoder | None = None) -> tuple[Image.Image, Box]:
    """RGB pixels of the encoded image ``data`` and ``box`` (default: the whole image) mapped onto them.

    A YCbCr or grayscale JPEG is decoded by ``decoder`` (default: the fastest installed) at the smallest factor
    that keeps ``box`` ≥ ``out`` pixels; if that decoder refuses the bytes, PIL decodes them at full size, so a
    damaged file fails with PIL's own error. Other images are decoded whole by PIL. Raises OSError/ValueError
    for bytes no decoder can read (callers check the size against the decompression-bomb limit beforehand).
    """
    opened = Image.open(io.BytesIO(data))
    w, h = opened.size
    box = box or (0.0, 0.0, float(w), float(h))
    if opened.format == "JPEG" and opened.mode in JPEG_MODES:
        dec = decoder or jpeg_decoder()
        factor = scale_factor(box, out, dec.factors)
        try:
            img = dec.decode(data, opened, factor)
        except (OSError, ValueError):
            opened = Image.open(io.BytesIO(data))  # PIL's error, or PIL's leniency, for what it refused
        else:
            return img, (box[0] * factor, box[1] * factor, box[2] * factor, box[3] * factor)
    opened.load()
    return (opened if opened.mode == "RGB" else opened.convert("RGB")), box


# Equal output quality, as bench/loader_throughput.py and tests/test_decode.py judge a decoder's views against
# PIL's full-size decode + resize: every view within PSNR ≥ 28 dB, and the views' mean absolute difference ≤ 2
# levels (of 255). DCT scaling measured on coco-mini: worst view 29.1 dB, mean difference 0.4-1.7 levels
# (texture such as foliage filtered differently; a JPEG at quality 75 itself is ~30-35 dB from its source).
TOLERANCE_PSNR_DB = 28.0
TOLERANCE_MEAN_ABS = 2.0


def view_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference, PSNR in dB, capped at 99) between two uint8 views of the same shape."""
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(d * d))
    return float(np.mean(np.abs(d))), 99.0 if mse == 0 else min(99.0, 10 * math.log10(255.0 ** 2 / mse))
