"""The one record type every source yields, so the rest of mmkd never cares where data came from."""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmkd.data.decode import Box, decode_rgb, jpeg_decoder
from mmkd.errors import MmkdError

ImageRef = Path | bytes | np.ndarray
MAX_PIXELS_ENV = "MMKD_MAX_IMAGE_PIXELS"


class DataError(MmkdError, ValueError):
    """Bad input data: the message names the file/field and what to do."""


ON_ERROR = ("raise", "skip")


@dataclass
class BadSamples:
    """What a reader does with a bad sample (a member missing, a shard cut short): ``raise`` stops at the first,
    naming it (the default); ``skip`` leaves it out and keeps the reason, so the run can count and log them."""

    policy: str = "raise"
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ON_ERROR:
            raise DataError(f"data.on_error: {self.policy!r} is not one of {', '.join(ON_ERROR)}")

    def report(self, error: DataError) -> None:
        """Raise ``error`` or, with ``skip``, record it: the caller then leaves the sample out."""
        if self.policy == "raise":
            raise error
        self.skipped.append(str(error))

    @property
    def count(self) -> int:
        return len(self.skipped)


@dataclass(frozen=True)
class Record:
    """One image with its captions.

    key: stable unique id (used by the teacher cache and by resume); image: a file path, encoded bytes
    (e.g. from a tar shard) or an HxWx3 uint8 array; captions: may be empty for uncaptioned images;
    label: class index for classification sets, else None; origin: where it came from, for error messages;
    shard: the data shard it was read from (a WebDataset tar), "" for in-memory sources: the teacher cache keeps
    one segment per shard, so a grown dataset is cached shard by shard.
    """

    key: str
    image: ImageRef
    captions: tuple[str, ...] = ()
    label: int | None = None
    origin: str = ""
    shard: str = ""


def clean_caption(text: Any, origin: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{origin}: caption must be a string, got {type(text).__name__}: {text!r}")
    text = text.strip()
    if not text:
        raise DataError(f"{origin}: empty caption; remove it or fill it with text")
    return text


def set_max_image_pixels(limit: int | None) -> None:
    """Refuse images of more than ``limit`` pixels (None: keep the current limit, PIL's 89,478,485 by default).

    The limit guards against decompression bombs (a small file that decodes to gigabytes). It is PIL's own
    process-wide setting (``Image.MAX_IMAGE_PIXELS``), so the CLI sets it once from ``data.max_image_pixels`` or
    the ``MMKD_MAX_IMAGE_PIXELS`` environment variable.
    """
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DataError(f"the image pixel limit must be a positive integer, got {limit!r}")
        Image.MAX_IMAGE_PIXELS = limit


def max_image_pixels_from_env() -> int | None:
    """``MMKD_MAX_IMAGE_PIXELS`` as an integer, None when unset; a bad value is a DataError naming the variable."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise DataError(f"environment variable {MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} must be a positive "
                        "integer (pixels)")
    return int(raw)


def _too_big(where: str, name: str, detail: str) -> DataError:
    return DataError(f"{where}: image {name} {detail}, over the limit of {Image.MAX_IMAGE_PIXELS} pixels (a "
                     "decompression-bomb guard); if it is genuine, raise data.max_image_pixels (or the environment "
                     f"variable {MAX_PIXELS_ENV}), else remove the sample")


@dataclass(frozen=True)
class EncodedImage:
    """A record's image read as far as its header (size known, pixel limit checked), decoded when a view asks.

    Decoding waits until the view's crop box and output size are known, so a JPEG is decoded only as large as
    that view needs (see ``mmkd.data.decode``); ``decoder`` names one (None: the fastest installed).
    """

    data: bytes
    size: tuple[int, int]
    where: str
    name: str
    decoder: str | None = None

    def decode(self, box: Box | None = None, out: int = 0) -> tuple[Image.Image, Box]:
        """RGB pixels on which ``box`` still spans ≥ ``out`` pixels, and ``box`` in their coordinates; a file that
        cannot be decoded is a DataError naming it."""
        try:
            return decode_rgb(self.data, box, out, jpeg_decoder(self.decoder) if self.decoder else None)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise _unreadable(self.where, self.name, e) from None


def _unreadable(where: str, name: str, e: Exception) -> DataError:
    # PIL names its input by repr ("cannot identify image file <_io.BytesIO object at 0x…>"): the name says it better
    reason = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__
    return DataError(f"{where}: cannot read image {name}: {reason}; remove the sample or replace the file")


def open_encoded(record: Record, decoder: str | None = None) -> EncodedImage | np.ndarray:
    """A record's image, not yet decoded (an in-memory array is returned as it is, once checked).

    The header is read and the size checked against the decompression-bomb limit here, before any decoding;
    a missing, unreadable or too large file is a DataError naming it.
    """
    ref = record.image
    where = record.origin or record.key
    name = str(ref) if not isinstance(ref, bytes) else "(bytes)"
    if isinstance(ref, np.ndarray):
        if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
            raise DataError(f"{where}: image array must be HxWx3 uint8, got {ref.shape} {ref.dtype}")
        return ref
    try:
        data = ref if isinstance(ref, bytes) else Path(ref).read_bytes()
        if not data:
            raise _unreadable(where, name, ValueError("the file is empty (0 bytes)"))
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size  # read from the header: refuse before decoding
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise _too_big(where, name, f"is {w}×{h} = {w * h} pixels")
    except FileNotFoundError:
        raise DataError(f"{where}: image file {ref} not found; check the path in your data file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning when made an error
        raise _too_big(where, name, f"is too large ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise _unreadable(where, name, e) from None
    return EncodedImage(data, (w, h), where, name, decoder)


def open_image(record: Record, decoder: str | None = None) -> Image.Image:
    """Decode a record's image as RGB at full size, or raise DataError naming the file (too large images
    included)."""
    enc = open_encoded(record, decoder)
    if isinstance(enc, np.ndarray):
        return Image.fromarray(enc)
    return enc.decode()[0]
