"""The one record type every source yields, so the rest of mmkd never cares where data came from."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmkd.errors import MmkdError

ImageRef = Path | bytes | np.ndarray


class DataError(MmkdError, ValueError):
    """Bad input data: the message names the file/field and what to do."""


@dataclass(frozen=True)
class Record:
    """One image with its captions.

    key: stable unique id (used by the teacher cache and by resume); image: a file path, encoded bytes
    (e.g. from a tar shard) or an HxWx3 uint8 array; captions: may be empty for uncaptioned images;
    label: class index for classification sets, else None; origin: where it came from, for error messages.
    """

    key: str
    image: ImageRef
    captions: tuple[str, ...] = ()
    label: int | None = None
    origin: str = ""


def open_image(record: Record) -> Image.Image:
    """Decode a record's image as RGB, or raise DataError naming the file."""
    ref = record.image
    where = record.origin or record.key
    if isinstance(ref, np.ndarray):
        if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
            raise DataError(f"{where}: image array must be HxWx3 uint8, got {ref.shape} {ref.dtype}")
        return Image.fromarray(ref)
    try:
        if isinstance(ref, bytes):
            img = Image.open(io.BytesIO(ref))
        else:
            img = Image.open(ref)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{where}: image file {ref} not found; check the path in your data file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: cannot read image {ref if not isinstance(ref, bytes) else '(bytes)'}: {e}; "
                        "remove the sample or replace the file") from None
    return img.convert("RGB")
