"""Claiming a cache folder for a build (create it, resume a build of the same settings, or refuse a folder that
holds something else), starting each data shard's segment, and publishing the finished segments in the manifest.
Called with the folder's lock held (segments: by the rank that builds them)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmkd.fileio import disk_full_error, is_disk_full
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache import format as fmt
from mmkd.teacher.cache.format import (
    DONE_FILE,
    INDEX_NAMES,
    LOCK_NAME,
    MANIFEST,
    SEGMENT_FILE,
    SEGMENTS,
    CacheError,
    read_json,
    read_manifest,
    read_meta,
    write_json,
    write_npy,
    write_strings,
)
from mmkd.teacher.cache.index import index_paths, write_index


def _committed(root: Path) -> bool:
    """Whether any chunk of the folder is committed (a done.json written): then it holds work worth keeping."""
    return (root / SEGMENTS).is_dir() and any((root / SEGMENTS).glob("*/*.done.json"))


def _clear_unfinished(root: Path) -> None:
    """Remove what a build that committed no chunk left (index files, uncommitted arrays); never other files."""
    for name in INDEX_NAMES:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for tmp in root.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _sweep_temporaries(root: Path) -> None:
    """Leftovers of a killed writer; the lock says no one writes now."""
    for tmp in [*root.glob(".*.tmp-*"), *root.glob(f"{SEGMENTS}/*/.*.tmp-*"), *root.glob(f"{fmt.INDEX}/.*.tmp-*")]:
        tmp.unlink(missing_ok=True)


def prepare_folder(root: Path, meta: dict[str, Any], tokenizer: Any, log: Callable[[str], None] | None = None) -> None:
    """Create the cache's settings (meta.json last: its commit), or check that an existing cache is of this build.

    A folder whose first build committed no chunk (it failed or was killed early, e.g. on bad data) is started
    over, so the corrected rerun is not refused as "other settings".
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
            _sweep_temporaries(root)
            return
    if root.exists() and not root.is_dir():
        raise CacheError(f"{root} exists and is a file, not a teacher cache folder; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in INDEX_NAMES and p.name != LOCK_NAME and ".tmp-" not in p.name)
    if foreign:
        raise CacheError(f"{root} exists and is not an mmkd teacher cache (no meta.json; it holds {foreign[:3]}); "
                         "choose another --out or delete it")
    _clear_unfinished(root)  # an earlier build killed before its meta.json: nothing of it was committed
    (root / SEGMENTS).mkdir(parents=True)
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(str(root / "tokenizer"))
        except Exception as e:  # the Rust tokenizer reports a full disk as a bare Exception
            if not is_disk_full(e, root):
                raise
            shutil.rmtree(root / "tokenizer", ignore_errors=True)
            raise disk_full_error(root / "tokenizer", "nothing of the cache was written yet") from None
    write_json(root / "meta.json", meta)  # last, atomically: a folder with meta.json has its complete settings


def check_same_build(root: Path, meta: dict[str, Any]) -> None:
    found = read_meta(root)
    names = ("this build", "the folder")
    # teacher.source is how the teacher was named (a relative or an absolute path, a hub id): its identity is the
    # weights', tokenizer's and config's hashes, so the same teacher named another way resumes the build
    mine, theirs = (dict(m["fingerprint"], teacher={k: v for k, v in m["fingerprint"]["teacher"].items()
                                                     if k != "source"}) for m in (meta, found))
    for m in (mine, theirs):  # a captioner, too, is its weights, not the name it was given by
        if isinstance(m.get("captioner"), dict):
            m["captioner"] = {k: v for k, v in m["captioner"].items() if k != "source"}
    if "decoder" not in theirs["transform"]:  # a cache from before the decoder was recorded: it may grow
        mine["transform"] = {k: v for k, v in mine["transform"].items() if k != "decoder"}
    differences = (fp.diff(mine, theirs, names=names) + fp.diff(meta["layout"], found["layout"], "layout", names))
    if differences:
        raise CacheError(f"{root} already holds a teacher cache built with other settings, so it cannot be resumed, "
                         f"completed or grown: {'; '.join(differences[:6])}"
                         f"{f' (and {len(differences) - 6} more)' if len(differences) > 6 else ''}. Use another "
                         "--out, or delete the folder to rebuild it")


# -------------------------------------------------------------------------------------------------- segments


def segment_meta(shard: str, keys: Sequence[str], digests: Sequence[str], captions: Sequence[str]) -> dict[str, Any]:
    """segment.json: which shard, and the fingerprint of its data (keys + content digests, captions)."""
    return {"shard": shard,
            "data": {"n_samples": len(keys), "sha256": fp.data_sha256(keys, digests), "n_captions": len(captions),
                     "captions_sha256": fp.captions_sha256(captions), "file_digest": "size"}}


def prepare_segment(folder: Path, seg: dict[str, Any], keys: Sequence[str], digests: Sequence[str],
                    captions: Sequence[str], log: Callable[[str], None] | None = None) -> None:
    """Write a segment's string tables and hashes, then ``segment.json`` (their commit); or check that the segment
    already there was built from this shard's data. A segment of other data that committed no chunk is started
    over; one with committed chunks is refused, naming what differs."""
    if (folder / SEGMENT_FILE).is_file():
        found = read_json(folder / SEGMENT_FILE, "")
        differences = fp.diff(seg, found, names=("this build", "the folder"))
        if not differences:
            return
        if any(folder.glob("*.done.json")):
            raise CacheError(f"segment {folder} (shard {seg['shard'] or 'in memory'}) was built from other data, so it "
                             f"cannot be resumed: {'; '.join(differences[:4])}. The samples of this shard changed "
                             "since the cache was built: build into a new --out, or delete the segment's folder to "
                             "recompute it")
        if log:
            log(f"{folder}: starting this segment over: it wrote no chunk and was for other data")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, strings in (("keys", keys), ("digests", digests), ("captions", captions)):
        write_strings(folder, name, strings)
    write_npy(folder / "keys.hash.npy", fmt.key_hashes(keys))
    write_npy(folder / "captions.hash.npy", fmt.key_hashes(captions))
    write_json(folder / SEGMENT_FILE, seg)


# -------------------------------------------------------------------------------------------------- manifest


def finished_segments(root: Path) -> set[str]:
    return {p.parent.name for p in (root / SEGMENTS).glob(f"*/{DONE_FILE}")}


def publish(root: Path, data_order: Sequence[str], final: bool = False) -> dict[str, Any]:
    """Write the manifest listing every finished segment: those already listed keep their rows, new ones follow
    in data order (then any other finished segment, by name). The key index of the new list is written first,
    under a new generation, so a reader of the old manifest keeps reading the old generation.

    Which generations stay: a publish during a build (``final`` false: at its start, or now and then) keeps the
    previous one too; the build's last publish (``final``) keeps only its own and that of the last build that
    ended (``last_final``, what readers of the finished cache hold). So the generations a killed build published
    are gone once its rerun ends, and the folder is what an uninterrupted build leaves."""
    old = read_manifest(root)
    listed = [s["name"] for s in old["segments"]] if old else []
    finished = finished_segments(root)
    names = [n for n in listed if n in finished]
    names += [n for n in data_order if n in finished and n not in names]
    names += sorted(finished - set(names))
    segments = []
    for name in names:
        seg = read_json(root / SEGMENTS / name / SEGMENT_FILE, "the segment is damaged: delete its folder and rerun")
        segments.append({"name": name, "shard": seg["shard"], "n_samples": seg["data"]["n_samples"],
                         "n_captions": seg["data"]["n_captions"], "data_sha256": seg["data"]["sha256"],
                         "captions_sha256": seg["data"]["captions_sha256"]})
    generation = hashlib.sha256(json.dumps(segments, sort_keys=True).encode()).hexdigest()[:16]
    # a manifest without "final" predates the key: it was a build's last (the only one short builds wrote)
    last_final = (old["index"] if old.get("final", True) else old.get("last_final")) if old else None
    manifest = {"format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
                "n_samples": sum(s["n_samples"] for s in segments),
                "n_captions": sum(s["n_captions"] for s in segments), "index": generation, "segments": segments,
                "final": final, "last_final": None if last_final == generation else last_final}
    written = all(p.is_file() for p in index_files(root, generation))
    if old is not None and old["segments"] == segments and written and (old.get("final", True) or not final):
        return old  # nothing new: leave the folder as it is
    if not written:
        folders = [root / SEGMENTS / s["name"] for s in segments]
        shards = [s["shard"] for s in segments]
        for what in ("keys", "captions"):
            write_index(root, generation, what, folders, shards, unique=what == "keys")
    write_json(root / MANIFEST, manifest)
    keep = {generation, last_final} | ({old["index"]} if old and not final else set())
    for p in (root / fmt.INDEX).glob("*.npy"):
        if p.name.split(".", 1)[0] not in keep:
            p.unlink(missing_ok=True)
    return manifest


def index_files(root: Path, generation: str) -> list[Path]:
    return [p for what in ("keys", "captions") for p in index_paths(root, generation, what).values()]
