"""Pairs files: one JSONL line per pair plus a ``FILE.meta.json`` sidecar naming the data and build settings.

Written atomically (pairs first, so a sidecar always has its pairs); read back with every bad line reported by
file and line number, so training reads the same images back by key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mmkd.data.records import DataError
from mmkd.errors import UsageError
from mmkd.fileio import atomic_write_text, read_jsonl
from mmkd.studies.matching.pairs import SPLITS, BuildConfig, Embed, MatchPair, build_pairs, summarize

FORMAT_VERSION = 1


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def write_pairs(path: str | Path, pairs: Sequence[MatchPair], meta: dict[str, Any]) -> Path:
    """Write the pairs JSONL and its sidecar atomically (the pairs first: a sidecar always has its pairs)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False, allow_nan=False) + "\n" for p in pairs))
    full = {"format": FORMAT_VERSION, **meta, "counts": summarize(pairs)}
    atomic_write_text(meta_path(path), json.dumps(full, indent=2, allow_nan=False))
    return path


@dataclass
class PairSet:
    """A pairs file read back: its settings (sidecar) and its pairs, per split."""

    path: Path
    meta: dict[str, Any]
    pairs: list[MatchPair]

    def split(self, name: str) -> list[MatchPair]:
        return [p for p in self.pairs if p.split == name]


_FIELDS = {f for f in MatchPair.__dataclass_fields__}


def read_pairs(path: str | Path) -> PairSet:
    """Read a pairs file and its sidecar; every bad line is reported with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} not found; build it with `mmkd matching build CONFIG pairs.file={path}`")
    mpath = meta_path(path)
    if not mpath.is_file():
        raise DataError(f"{mpath} not found: it is written beside the pairs file by `mmkd matching build` and "
                        "names the data set the image keys refer to; rebuild the pairs")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath}: not valid JSON ({e}); rebuild the pairs") from None
    if not isinstance(meta, dict) or "data" not in meta:
        raise DataError(f"{mpath}: has no 'data' field; rebuild the pairs with `mmkd matching build`")
    pairs: list[MatchPair] = []
    for no, obj in read_jsonl(path, "a pair file", DataError):
        where = f"{path}:{no}"
        missing = {"split", "image_key", "caption", "label"} - set(obj)
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        if obj["split"] not in SPLITS:
            raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {obj['split']!r}")
        if obj["label"] not in (0, 1) or isinstance(obj["label"], bool):
            raise DataError(f"{where}: label must be 0 or 1, got {obj['label']!r}")
        if not isinstance(obj["caption"], str) or not obj["caption"].strip():
            raise DataError(f"{where}: caption must be a non-empty string")
        pairs.append(MatchPair(**{k: v for k, v in obj.items() if k in _FIELDS}))
    for s in SPLITS:
        labels = {p.label for p in pairs if p.split == s}
        if labels != {0, 1}:
            raise DataError(f"{path}: the {s} split needs both matching and mismatching pairs, has labels "
                            f"{sorted(labels)}; rebuild the pairs")
    return PairSet(path, meta, pairs)


def build_pairs_file(spec: str, out: str | Path, cfg: BuildConfig, cache_dir: str | Path = "runs/.cache",
                     world_n: int = 4000, embed: Embed | None = None, limit: int | None = None,
                     text_encoder: str | None = None) -> tuple[Path, dict[str, dict[str, int]]]:
    """Read a data spec, build the pairs and write them (with the sidecar); returns the path and the counts.

    ``world:`` specs turn on the world's attribute swaps and colour/shape guard. Hard or mixed negatives load
    the sentence encoder (``text_encoder``: a folder or hub id, default all-MiniLM-L6-v2) unless ``embed`` is given.
    """
    from mmkd.data.resolve import records_from_spec

    is_world = spec.startswith("world:")
    cfg = replace(cfg, world_attributes=is_world)
    records = records_from_spec(spec, cache_dir, world_n=world_n)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    encoder_name = getattr(embed, "path", None)
    if embed is None and cfg.negatives != "random":
        from mmkd.studies.matching.text import TextEncoder

        enc = TextEncoder(text_encoder)
        embed, encoder_name = enc, enc.path
    pairs = build_pairs(records, cfg, embed)
    meta = {"data": spec, "world_n": world_n if is_world else None,
            "cache": str(Path(cache_dir).resolve()) if is_world else None, "limit": limit,
            "text_encoder": encoder_name, "build": asdict(cfg)}
    path = write_pairs(out, pairs, meta)
    return path, summarize(pairs)
