"""Claiming a cache folder for a build: create its index, resume a build of the same settings, or refuse a
folder that holds something else. Called with the folder's lock held."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache.format import INDEX_NAMES, LOCK_NAME, CacheError, read_meta, write_json


def _committed(root: Path) -> bool:
    """Whether any chunk of the folder is committed (its done.json written): then it holds work worth keeping."""
    return (root / "shards").is_dir() and any((root / "shards").glob("*.done.json"))


def _clear_unfinished(root: Path) -> None:
    """Remove what a build that committed no chunk left (index files, uncommitted shards); never other files."""
    for name in INDEX_NAMES:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for tmp in root.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def prepare_folder(root: Path, meta: dict[str, Any], keys: list[str], digests: list[str], captions: list[str],
             tokenizer: Any, log: Callable[[str], None] | None = None) -> None:
    """Create the cache's index (meta.json last: its commit), or check that an existing cache is of this build.

    Called with the folder's lock held. A folder whose first build committed no chunk (it failed or was killed
    early, e.g. on bad data) is started over, so the corrected rerun is not refused as "other settings".
    """
    if (root / "meta.json").is_file():
        try:
            check_same_build(root, meta)
        except CacheError as e:
            if _committed(root):
                raise
            if log:
                log(f"{root}: starting over: its earlier build wrote no chunk, and was for other settings ({e})")
            _clear_unfinished(root)
        else:
            for tmp in (root / "shards").glob(".*.tmp-*"):  # leftovers of a killed writer; the lock says no one writes
                tmp.unlink(missing_ok=True)
            return
    if root.exists() and not root.is_dir():
        raise CacheError(f"{root} exists and is a file, not a teacher cache folder; choose another --out")
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in INDEX_NAMES and p.name != LOCK_NAME and ".tmp-" not in p.name)
    if foreign:
        raise CacheError(f"{root} exists and is not an mmkd teacher cache (no meta.json; it holds {foreign[:3]}); "
                         "choose another --out or delete it")
    _clear_unfinished(root)  # an earlier build killed before its meta.json: nothing of it was committed
    (root / "shards").mkdir(parents=True)
    write_json(root / "keys.json", {"keys": keys, "digests": digests})
    write_json(root / "captions.json", captions)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(root / "tokenizer"))
    write_json(root / "meta.json", meta)  # last, atomically: a folder with meta.json has its complete index


def check_same_build(root: Path, meta: dict[str, Any]) -> None:
    found = read_meta(root)
    names = ("this build", "the folder")
    # teacher.source is how the teacher was named (a relative or an absolute path, a hub id): its identity is the
    # weights', tokenizer's and config's hashes, so the same teacher named another way resumes the build
    mine, theirs = (dict(m["fingerprint"], teacher={k: v for k, v in m["fingerprint"]["teacher"].items()
                                                     if k != "source"}) for m in (meta, found))
    differences = (fp.diff(mine, theirs, names=names) + fp.diff(meta["layout"], found["layout"], "layout", names))
    if differences:
        raise CacheError(f"{root} already holds a teacher cache built with other settings, so it cannot be resumed "
                         f"or completed: {'; '.join(differences[:6])}"
                         f"{f' (and {len(differences) - 6} more)' if len(differences) > 6 else ''}. Use another "
                         "--out, or delete the folder to rebuild it")

