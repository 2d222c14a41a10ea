"""Readers for every on-disk data format, all yielding `Record`s, so training never branches on format.

Data are named by ``FORMAT:PATH`` specs everywhere (CLI, configs); format options are plain keyword
arguments of `read_records` / `class_names` (no ``?a=b`` syntax, so paths never need quoting):

====================  ==========================================================================
spec                  options (defaults)
====================  ==========================================================================
``jsonl:FILE``        ``image_root=None`` (default: the JSONL's folder), ``check_files=True``
``csv:FILE``          ``image_key="filepath"``, ``caption_key="title"``, ``label_key=None``,
                      ``sep=","``, ``image_root=None``, ``check_files=True``  (open_clip's defaults)
``tsv:FILE``          as csv with ``sep="\\t"``
``coco:FILE``         ``image_root=None`` (default: ``images/`` beside the JSON if it exists, else
                      the JSON's folder), ``check_files=True``
``imagefolder:DIR``   ``check_files`` (accepted for symmetry; files are found by listing)
``wds:SHARDS``        ``caption_key=None`` (auto: ``txt`` then ``json``), ``image_key=None`` (auto:
                      jpg/jpeg/png/webp), ``label_key="cls"``
``cifar10:PATH``      ``split="train"`` ("train"/"test"); PATH = ``cifar-10-batches-py`` (or its
                      parent) or WebDataset shards (a folder of ``train-*.tar``/``test-*.tar``, a tar,
                      a brace pattern)
``cifar100:DIR``      ``split="train"`` ("train"/"test"); ``cifar-100-python`` (or its parent)
``stl10:DIR``         ``split="train"`` ("train"/"test"/"unlabeled"); ``stl10_binary`` (or its parent)
====================  ==========================================================================

SHARDS: a tar, a folder of tars, a brace pattern ``train-{0000..0004}.tar`` / ``{a,b}.tar``, or a
comma-separated list of any of those, a ``pipe:COMMAND`` or an fsspec URL (``s3://``, ``gs://``, ``https://``,
``file://``). `read_records` is eager (a list) but images stay lazy: file paths, encoded bytes from tars, or
uint8 arrays for pickled/binary sets; training streams shards instead (`mmkd.data.sharded`).
Every problem raises `DataError` naming the file (and line/row/sample) and what to do.

The package holds the registry and spec parsing (``registry``), the checks all readers share (``checks``) and one
module per family of formats (``captions``, ``folders``, ``webdataset``, ``classification``), each registering its
formats on import; a new format is a new module imported here.
"""

from __future__ import annotations

from mmkd.data.records import DataError

# the format modules register their readers when imported here
from mmkd.data.sources import captions, classification, folders, webdataset  # noqa: F401
from mmkd.data.sources.registry import FORMATS, SourceFormat, check_options, class_names, parse_spec, read_records
from mmkd.data.sources.webdataset import expand_braces, shard_paths

__all__ = ["FORMATS", "DataError", "SourceFormat", "check_options", "class_names", "expand_braces", "parse_spec",
           "read_records", "shard_paths"]
