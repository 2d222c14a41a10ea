"""The format registry and the ``FORMAT:PATH`` spec: how a spec finds its reader and its options are
checked, kept apart from the readers so adding a format never touches the dispatch."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmkd.data.records import BadSamples, DataError, Record
from mmkd.registry import Registry


@dataclass(frozen=True)
class SourceFormat:
    """A registered format: how to read its records and (for classification sets) its class names."""

    name: str
    read: Callable[..., list[Record]]
    class_names: Callable[..., list[str] | None] | None = None


FORMATS: Registry[SourceFormat] = Registry("data format")


def register_format(name: str, class_names: Callable[..., list[str] | None] | None = None):
    """Register a reader function under `name` (filled once at import; nothing mutates it later)."""

    def deco(fn: Callable[..., list[Record]]) -> Callable[..., list[Record]]:
        FORMATS.register(name)(SourceFormat(name, fn, class_names))
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- public API


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``FORMAT:PATH``; an unknown or missing format fails listing the valid ones."""
    valid = ", ".join(FORMATS.names())
    fmt, sep, path = spec.partition(":")
    fmt = fmt.strip().lower()
    if not sep or not fmt:
        raise DataError(f"data spec {spec!r} must look like FORMAT:PATH, e.g. jsonl:data/captions.jsonl; "
                        f"valid formats: {valid}")
    if fmt not in FORMATS:
        raise DataError(f"data spec {spec!r}: unknown format {fmt!r}; valid formats: {valid}")
    if not path.strip():
        raise DataError(f"data spec {spec!r} has no path after '{fmt}:'")
    return fmt, path.strip()


def read_records(spec: str, bad: BadSamples | None = None, **options: Any) -> list[Record]:
    """Read all records of a ``FORMAT:PATH`` spec; keys are unique (DataError naming duplicates if not).

    bad: what to do with a bad sample in formats that can tell one (WebDataset shards): raise (default) or skip
    and count it.
    """
    fmt, path = parse_spec(spec)
    src = FORMATS.get(fmt)
    check_options(src, options)
    if "bad" in inspect.signature(src.read).parameters:
        options = {**options, "bad": bad}
    records = src.read(path, **options)
    _check_unique_keys(records, spec)
    return records


def class_names(spec: str, **options: Any) -> list[str] | None:
    """Class names (index i = label i) for classification sets; None for caption-only formats.

    Accepts the same options as `read_records` so callers can pass one options dict to both.
    """
    fmt, path = parse_spec(spec)
    src = FORMATS.get(fmt)
    check_options(src, options)
    if src.class_names is None:
        return None
    accepted = inspect.signature(src.class_names).parameters
    return src.class_names(path, **{k: v for k, v in options.items() if k in accepted})


# ------------------------------------------------------------------------------------------------- helpers


def check_options(src: SourceFormat, options: dict[str, Any]) -> None:
    params = inspect.signature(src.read).parameters
    valid = [p for p in params if p not in ("path", "bad")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"format {src.name!r} has no option(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(valid) or '(none)'}")


def _check_unique_keys(records: list[Record], where: str) -> None:
    seen: dict[str, Record] = {}
    dups: list[str] = []
    for r in records:
        first = seen.setdefault(r.key, r)
        if first is not r:
            dups.append(f"{r.key!r} ({first.origin} and {r.origin})")
    if dups:
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise DataError(f"{where}: duplicate record keys {', '.join(dups[:5])}{more}; "
                        "keys must be unique: remove the repeated entries or give them distinct ids")


