"""WebDataset shards as a lazy, random-access sequence of records: memory O(shards), never O(samples).

``ShardedRecords[i]`` reads sample i from its shard (one seek and one read, at the span the index recorded) and
turns it into a `Record` the way the eager reader did. Len, slicing to a prefix (``data.limit``) and per-record
rewrites (``label_captions``, dropping captions of unpaired images) are lazy too, so a dataset of any size
costs its index's O(shards) lists plus a memory map of the spans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, overload

import numpy as np

from mmkd.data.records import BadSamples, DataError, Record
from mmkd.data.shard_index import ShardIndex, load_or_build, read_span
from mmkd.data.shards import ShardStore, shard_refs
from mmkd.data.wds_samples import wds_class_names, wds_record

RecordFn = Callable[[Record], Record]


class ShardedRecords(Sequence[Record]):
    """Records of a shard spec, read on demand; the shard layout (``shard_counts``) drives shard-local shuffling."""

    def __init__(self, index: ShardIndex, store: ShardStore, to_record: Callable[[str, str, dict[str, bytes]], Record],
                 limit: int | None = None, fns: tuple[RecordFn, ...] = ()) -> None:
        self.index, self.store, self.to_record = index, store, to_record
        self.limit = index.n if limit is None else min(limit, index.n)
        self.fns = fns

    # -- the shard layout
    @property
    def shard_counts(self) -> np.ndarray:
        """Samples per shard after ``limit`` (a prefix of the shards in spec order)."""
        counts = self.index.counts.copy()
        cum = np.cumsum(counts)
        over = np.nonzero(cum > self.limit)[0]
        if len(over):
            s = int(over[0])
            counts[s] -= int(cum[s] - self.limit)
            counts[s + 1:] = 0
        return counts

    def fingerprint(self) -> dict[str, Any]:
        return {**self.index.fingerprint(), "n": self.limit}

    # -- Sequence
    def __len__(self) -> int:
        return self.limit

    @overload
    def __getitem__(self, i: int) -> Record: ...

    @overload
    def __getitem__(self, i: slice) -> ShardedRecords: ...

    def __getitem__(self, i: int | slice) -> Record | ShardedRecords:
        if isinstance(i, slice):
            start, stop, step = i.indices(self.limit)
            if start != 0 or step != 1:
                raise ValueError("sharded records slice to a prefix only ([:n])")
            return ShardedRecords(self.index, self.store, self.to_record, stop, self.fns)
        i = int(i)
        if i < 0:
            i += self.limit
        if not 0 <= i < self.limit:
            raise IndexError(f"sample {i} of {self.limit}")
        s, j = self.index.locate(i)
        name = self.index.refs[s].name
        start, end = (int(v) for v in self.index.spans[self.index.offsets[s] + j])
        key, parts = read_span(self.store.read(s, start, end), name)
        rec = self.to_record(name, key, parts)
        for fn in self.fns:
            rec = fn(rec)
        return rec

    def __iter__(self) -> Iterator[Record]:
        for i in range(self.limit):
            yield self[i]

    def __add__(self, other: Sequence[Record]) -> list[Record]:
        """Every record in a list (tools that concatenate sources, e.g. a cache build over paired + unpaired)."""
        return list(self) + list(other)

    def __radd__(self, other: Sequence[Record]) -> list[Record]:
        return list(other) + list(self)

    def map(self, fn: RecordFn) -> ShardedRecords:
        """The same samples with ``fn`` applied to each record as it is read."""
        return ShardedRecords(self.index, self.store, self.to_record, self.limit, (*self.fns, fn))


def open_shards(spec_path: str, cache_dir: str | Path | None, bad: BadSamples | None = None,
                caption_key: str | None = None, image_key: str | None = None, label_key: str | None = "cls",
                max_cached: int = 16) -> ShardedRecords:
    """A ``wds:`` spec's records, indexed once under ``cache_dir/shards`` (None: in memory, remote shards refused).

    Options are the eager reader's (``caption_key``, ``image_key``, ``label_key``); max_cached bounds how many
    fetched (remote, piped or compressed) shards stay on local disk at once."""
    import hashlib
    import json

    bad = bad or BadSamples()
    refs = shard_refs(spec_path)
    cap_ext = caption_key.lstrip(".").lower() if caption_key else None
    img_ext = image_key.lstrip(".").lower() if image_key else None
    lab_ext = label_key.lstrip(".").lower() if label_key else None
    labelled_set = bool(lab_ext) and wds_class_names(spec_path) is not None
    to_record = partial(wds_record, cap_ext=cap_ext, img_ext=img_ext, lab_ext=lab_ext)
    identity = {"spec": spec_path, "caption_key": cap_ext, "image_key": img_ext, "label_key": lab_ext,
                "labelled": labelled_set}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) / "shards" if cache_dir is not None else None
    store = ShardStore(refs, root / "fetched" if root is not None else None, max_cached=max_cached)
    needs = (None if cap_ext else "txt,json", lab_ext if labelled_set else None)
    index = load_or_build(refs, store, root / f"index-{digest}" if root is not None else None, to_record, bad,
                          needs, identity)
    store.digests = dict(enumerate(index.digests))  # a shard fetched again must be the one indexed
    if index.n == 0:
        raise DataError(f"shard spec {spec_path!r} holds no usable samples "
                        f"({len(bad.skipped)} left out as bad{': ' + bad.skipped[0] if bad.skipped else ''})")
    return ShardedRecords(index, store, to_record)
