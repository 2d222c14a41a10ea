"""Each test image's zero-shot top-1 correctness, stored beside a run's ``metrics.json`` as bitmasks.

``mmkd sweep``'s leaderboard resamples test images (a bootstrap interval of top-1, and of a run's Δ vs its
from-scratch reference) from these; one bit per image keeps the file small (1.3 kB for 10,000 images). The file
is JSON (no code runs when it is read): ``{"format": 1, "zeroshot": {EVAL NAME: {"n": N, "top1": BASE64}}}``
where BASE64 is numpy's ``packbits`` of the N correctness bits, image order as evaluated.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.errors import MmkdError
from mmkd.fileio import atomic_write_json

PER_IMAGE_FILE = "eval_per_image.json"
FORMAT = 1


class PerImageError(MmkdError, ValueError):
    """A per-image results file that cannot be read: the message names it and what to do."""


def pack_hits(hits: Any) -> dict[str, Any]:
    bits = np.asarray(hits, dtype=bool).reshape(-1)
    return {"n": int(bits.size), "top1": base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")}


def unpack_hits(block: Mapping[str, Any]) -> np.ndarray:
    n = int(block["n"])
    raw = np.frombuffer(base64.b64decode(block["top1"], validate=True), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(f"{raw.size} bytes for {n} images")
    return np.unpackbits(raw, count=n).astype(bool)


def write_per_image(folder: str | Path, hits: Mapping[str, Any]) -> None:
    """Write ``FOLDER/eval_per_image.json`` (nothing when there is no zero-shot entry)."""
    if hits:
        atomic_write_json(Path(folder) / PER_IMAGE_FILE,
                          {"format": FORMAT, "zeroshot": {name: pack_hits(h) for name, h in hits.items()}})


def read_per_image(folder: str | Path) -> dict[str, np.ndarray]:
    """``{eval name: bool [N]}`` of a run folder; empty when the run has none (e.g. finished before this file)."""
    path = Path(folder) / PER_IMAGE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this mmkd reads {FORMAT}")
        return {name: unpack_hits(block) for name, block in data["zeroshot"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise PerImageError(f"{path}: not a per-image results file ({e}); delete it (the leaderboard then has no "
                            "interval for this run) or re-run the run's evaluation") from None
