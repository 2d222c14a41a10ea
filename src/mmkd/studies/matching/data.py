"""A pairs file as tensors: distinct images and captions once, each split as index arrays into them.

Images are decoded, resized and centre-cropped once per image size and kept as uint8 (a quarter of the
float memory); a batch is normalised when it is drawn. Captions are held once each, so every cached
feature or logit is computed once per distinct caption or pair, never per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmkd.data.records import DataError, Record, open_image
from mmkd.data.transforms import center_box, crop_resize, to_pil
from mmkd.studies.matching.pairfile import PairSet, read_pairs
from mmkd.studies.matching.pairs import SPLITS, MatchPair


@dataclass
class SplitIndex:
    pairs: list[MatchPair]
    image_idx: torch.Tensor  # long [n] into PairData.records
    caption_idx: torch.Tensor  # long [n] into PairData.captions
    labels: torch.Tensor  # float [n]

    def __len__(self) -> int:
        return len(self.pairs)


class ImageStore:
    """uint8 [N, S, S, 3] images at one size; ``batch`` returns normalised float [B, 3, S, S]."""

    def __init__(self, records: Sequence[Record], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        arrays = []
        for r in records:
            if isinstance(r.image, np.ndarray) and r.image.shape == (size, size, 3) and r.image.dtype == np.uint8:
                arrays.append(r.image)
                continue
            img = to_pil(r.image) if isinstance(r.image, np.ndarray) else open_image(r)
            arrays.append(np.asarray(crop_resize(img, center_box(*img.size), size)))
        self.data = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, size, size, 3, dtype=torch.uint8)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.data[idx].permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std


class PairData:
    """The pairs of a pairs file with their images resolved from the data spec its sidecar names."""

    def __init__(self, pairset: PairSet, records: Sequence[Record]) -> None:
        self.pairset = pairset
        by_key = {r.key: r for r in records}
        keys = list(dict.fromkeys(p.image_key for p in pairset.pairs))
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise DataError(f"{pairset.path}: {len(missing)} image key(s) not found in data "
                            f"{pairset.meta.get('data')!r} (first: {missing[0]!r}); the data changed since the "
                            "pairs were built; rebuild them")
        self.records = [by_key[k] for k in keys]
        self.captions = list(dict.fromkeys(p.caption for p in pairset.pairs))
        img_pos = {k: i for i, k in enumerate(keys)}
        cap_pos = {c: i for i, c in enumerate(self.captions)}
        self.splits: dict[str, SplitIndex] = {}
        for s in SPLITS:
            ps = pairset.split(s)
            self.splits[s] = SplitIndex(
                ps, torch.tensor([img_pos[p.image_key] for p in ps], dtype=torch.long),
                torch.tensor([cap_pos[p.caption] for p in ps], dtype=torch.long),
                torch.tensor([p.label for p in ps], dtype=torch.float32))
        self._stores: dict[tuple, ImageStore] = {}

    def images(self, size: int, mean: Sequence[float], std: Sequence[float]) -> ImageStore:
        key = (size, tuple(mean), tuple(std))
        if key not in self._stores:
            self._stores[key] = ImageStore(self.records, size, mean, std)
        return self._stores[key]


def load_pair_data(path: str | Path, cache_dir: str | Path | None = None) -> PairData:
    """Read a pairs file and the records of the data set it was built from (by its sidecar)."""
    from mmkd.data.resolve import records_from_spec

    pairset = read_pairs(path)
    meta = pairset.meta
    options = dict(meta.get("options") or {})
    records = records_from_spec(meta["data"], cache_dir or meta.get("cache") or "runs/.cache",
                                world_n=int(meta.get("world_n") or 4000), **options)
    return PairData(pairset, records)
