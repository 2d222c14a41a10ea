"""The ``wds:`` format: WebDataset shards read whole into a list. Parsing a sample lives in `mmkd.data.wds_samples`;
shard specs, fetching and indexing in `mmkd.data.shards` / `shard_index`; streaming in `mmkd.data.sharded`."""

from __future__ import annotations

import tempfile

from mmkd.data.records import BadSamples, Record
from mmkd.data.sharded import open_shards
from mmkd.data.shards import expand_braces, shard_paths
from mmkd.data.sources.registry import register_format
from mmkd.data.wds_samples import wds_class_names, wds_record

__all__ = ["expand_braces", "read_wds", "shard_paths", "wds_class_names", "wds_record"]


@register_format("wds", class_names=wds_class_names)
def read_wds(path: str, caption_key: str | None = None, image_key: str | None = None,
             label_key: str | None = "cls", bad: BadSamples | None = None) -> list[Record]:
    """Every record of WebDataset shards, as a list (for small sets and tools that want one).

    Training streams instead (`mmkd.data.sharded.open_shards`, the same validation): an explicitly requested
    ``caption_key`` missing from a sample fails at that sample, listing the extensions present, instead of
    silently yielding nothing as webdataset pipelines do. A caption that other samples have, and in a
    classification set (``classes.txt`` beside the shards) a label, is needed by every sample: one without it is
    reported by shard and key (``bad``: raise, or skip and count it), as is the last sample of a shard cut short.
    """
    with tempfile.TemporaryDirectory(prefix="mmkd-wds-") as tmp:  # remote shards are fetched here, one by one
        return list(open_shards(path, tmp, bad, caption_key, image_key, label_key))
