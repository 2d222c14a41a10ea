"""Data-spec paths checked before any compute, and suite specs rebased onto the suite file's folder.

A run reads its data long after it starts (evaluation data only after training), so a wrong path must be found
up front, named by the config key that holds it; remote shards (URLs, ``pipe:``) are checked when fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmkd.data.records import DataError
from mmkd.data.shards import URL_RE, _split_top_level, shard_refs
from mmkd.data.sources.registry import parse_spec
from mmkd.errors import ConfigError

SHARD_FORMATS = ("wds", "cifar10")  # paths that may be comma lists or brace patterns of shards


def _remote(part: str) -> bool:
    return part.startswith("pipe:") or bool(URL_RE.match(part))


def check_spec_paths(spec: str, key: str) -> None:
    """Raise ConfigError naming ``key`` when a data spec's local file, folder or shard does not exist."""
    fmt = spec.partition(":")[0].strip().lower()
    if fmt == "world":
        return
    try:
        fmt, path = parse_spec(spec)
        if fmt in SHARD_FORMATS and not Path(path).expanduser().is_dir():
            if not all(_remote(p) for p in _split_top_level(path)):
                shard_refs(path)  # every local shard must exist; remote ones are checked when fetched
            return
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None
    p = Path(path).expanduser()
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative to {os.getcwd()})"
        raise ConfigError(f"{key}: {fmt}:{path}: {p} not found{where}; fix the path (nothing was computed)")


def rebase_spec(spec: str, root: str | Path) -> str:
    """``spec`` with its relative local paths joined onto ``root`` (a suite file's folder); absolute paths,
    URLs, ``pipe:`` commands and the built-in world are kept as written."""
    fmt, sep, path = spec.partition(":")
    if not sep or fmt.strip().lower() == "world" or not path.strip():
        return spec
    parts = (_split_top_level(path) if fmt.strip().lower() in SHARD_FORMATS and not path.strip().startswith("pipe:")
             else [path.strip()])
    return f"{fmt}:" + ",".join(rebase_path(p, root) for p in parts)


def rebase_path(path: str, root: str | Path) -> str:
    """A relative local path joined onto ``root``; anything else (absolute, ``~``, URL, ``pipe:``) as is."""
    if _remote(path) or path.startswith("~") or Path(path).is_absolute():
        return path
    return os.path.normpath(os.path.join(str(root), path))
