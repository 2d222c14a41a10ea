"""One entry point from a data spec to records: the built-in world or any on-disk format in ``sources``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

from mmkd.data import sources, world
from mmkd.data.records import BadSamples, DataError, Record

WORLD_SPLITS = ("train", "val", "test", "pool")


def records_from_spec(spec: str, cache_dir: str | Path = "runs/.cache", world_n: int = 4000,
                      world_seed: int = 0, bad: BadSamples | None = None, stream: bool = False,
                      **options) -> Sequence[Record]:
    """``world:SPLIT`` generates (or reads cached) built-in world images; ``FORMAT:PATH`` reads files.

    bad: raise at a bad sample (default) or skip and count it (formats that can tell one; see sources).
    stream: WebDataset shards (``wds:``) become a lazy `ShardedRecords` indexed under ``cache_dir/shards`` (read
    on demand, memory O(shards)) instead of a list of every sample; other formats are lists either way."""
    fmt, _, rest = spec.partition(":")
    if fmt == "world":
        split = rest or "train"
        if split not in WORLD_SPLITS:
            raise DataError(f"data spec {spec!r}: world split must be one of {', '.join(WORLD_SPLITS)}")
        return world.to_records(world.load_split(split, world_n, Path(cache_dir) / "world", seed=world_seed))
    if stream and fmt.strip().lower() == "wds":
        from mmkd.data.sharded import open_shards

        sources.check_options(sources.FORMATS.get("wds"), options)
        return open_shards(rest.strip(), cache_dir, bad, **options)
    return sources.read_records(spec, bad=bad, **options)


def split_options(spec: str, split: str | None, strict: bool = False) -> dict[str, str]:
    """``{"split": split}`` for the formats whose reader has splits (CIFAR-10/100, STL-10); for another format
    nothing, or with ``strict`` (a split the user named in a run's ``eval:``) a DataError saying which have."""
    if split is None:
        return {}
    fmt = spec.partition(":")[0].strip().lower()
    if fmt in split_formats():
        return {"split": split}
    if strict:
        raise DataError(f"data spec {spec!r}: split {split!r} given, but only {', '.join(split_formats())} "
                        "have splits; point the spec at the split's files instead")
    return {}


def split_formats() -> list[str]:
    """The registered formats whose reader takes a ``split`` (a plugin format with one counts too)."""
    return [n for n in sources.FORMATS.names() if "split" in inspect.signature(sources.FORMATS.get(n).read).parameters]


def zeroshot_classes(spec: str, class_set: str | None = None, templates: str | Path | None = None,
                     split: str | None = None) -> tuple[list[str], list[str]]:
    """Class names (as written into prompts) and prompt templates for a labelled data spec.

    Templates: ``templates`` (a built-in ensemble name or a file) if given, else the world's own for
    ``world:``, else CLIP_benchmark's ensemble for the format (`mmkd.data.templates`). Underscores in class
    names become spaces (CIFAR-100's ``maple_tree`` → "maple tree"), as CLIP_benchmark's class lists have them.
    """
    from mmkd.data.templates import load_templates, templates_for_format

    fmt, _, _ = spec.partition(":")
    fmt = fmt.strip().lower()
    if fmt == "world":
        cs = class_set or "colour_shape"
        sets = world.class_sets()
        if cs not in sets:
            raise DataError(f"class set {cs!r} unknown for world:; valid: {', '.join(sets)}")
        return sets[cs], load_templates(templates) if templates else world.templates(cs)
    names = sources.class_names(spec, **split_options(spec, split))
    if not names:
        raise DataError(f"data spec {spec!r} has no class names; zero-shot needs a labelled set "
                         "(imagefolder, cifar10, cifar100, stl10, wds with classes.txt)")
    names = [n.replace("_", " ") for n in names]
    return names, load_templates(templates) if templates else templates_for_format(fmt)
