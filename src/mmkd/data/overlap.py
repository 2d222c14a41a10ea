"""Evaluation data that is also training data: counted, so a run can say its scores are not held out.

An image is the same when it is the same file (resolved path) or has the same bytes (encoded images, arrays);
a caption when its text is the same after whitespace and case are folded. Keys are not compared: two formats
of one dataset (a JSONL and its COCO JSON) give one photo different keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.data.records import Record


@dataclass(frozen=True)
class Overlap:
    """How many of an evaluation set's images and captions the training data holds too."""

    images: int
    of_images: int
    captions: int
    of_captions: int

    @property
    def any(self) -> bool:
        return bool(self.images or self.captions)

    def to_json(self) -> dict[str, int]:
        return {"images": self.images, "of_images": self.of_images, "captions": self.captions,
                "of_captions": self.of_captions}


def image_identity(record: Record) -> str:
    """The same string for the same image: its resolved path, or a digest of its bytes / pixels."""
    ref = record.image
    if isinstance(ref, bytes):
        return "sha1:" + hashlib.sha1(ref).hexdigest()
    if isinstance(ref, np.ndarray):
        return "sha1:" + hashlib.sha1(np.ascontiguousarray(ref).tobytes()).hexdigest()
    return "path:" + os.path.realpath(Path(ref).expanduser())


def _caption(text: str) -> str:
    return " ".join(text.lower().split())


def training_identities(records: Sequence[Record]) -> tuple[set[str], set[str]]:
    """The image identities and folded captions of training records (computed once for every eval set)."""
    return {image_identity(r) for r in records}, {_caption(c) for r in records for c in r.captions}


def overlap(train: tuple[set[str], set[str]], test: Sequence[Record]) -> Overlap:
    """Count ``test``'s images and captions found in ``train`` (from `training_identities`)."""
    images, captions = train
    caps = [_caption(c) for r in test for c in r.captions]
    return Overlap(sum(image_identity(r) in images for r in test), len(test), sum(c in captions for c in caps),
                   len(caps))
