"""A run folder belongs to one run: what a folder holds, whether a config may start or resume there.

A run is identified by its run id, the hash of its config (without the keys that may change on resume) and
fingerprints of its data, teacher and teacher cache; every checkpoint and ``metrics.json`` records them.
``RESUMABLE_KEYS`` is the one list of config keys that may differ between a checkpoint and the config that
resumes it (README: "Run folders, --resume and --overwrite").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd.config import RunConfig
from mmkd.config_io import to_dict
from mmkd.errors import ConfigError
from mmkd.locking import FolderLock
from mmkd.teacher import fingerprint as fp

# config keys (dotted; a key covers everything below it) that a resumed run may change: they change how long
# the run goes on, how often it logs/evaluates/checkpoints, how many threads it uses, which device it runs on
# (a preempted GPU job resumes on another GPU or the CPU) and where it lives, never what one training step
# computes. train.steps stretches the cosine schedule from the resume step on.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.threads",
                  "train.device", "eval", "out", "cache_dir")
# what marks a folder as holding a run (config.yaml is written only once a run has really started)
RUN_FILES = ("checkpoints", "metrics.json", "student", "metrics.jsonl", "config.yaml")
RESUME_MODES = ("no", "yes", "auto")


class RunFolderError(ConfigError):
    """A run folder that this run may not use as asked: the message names what was found and what to do."""


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{path}.{k}" if path else str(k)))
        return out
    return {path: value}


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def run_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data, JSON round-tripped (tuples become lists, as in a checkpoint)."""
    return json.loads(json.dumps(to_dict(cfg), default=str))


def config_sha256(config: dict[str, Any]) -> str:
    """Hash of everything in the config that a resume must keep (RESUMABLE_KEYS left out)."""
    kept = {k: v for k, v in _flatten(config).items() if not _resumable(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys outside RESUMABLE_KEYS whose values differ, each with both values."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if _resumable(key) or (key in a and key in b and a[key] == b[key]):
            continue
        out.append(f"{key}: checkpoint {fp.short(a.get(key))}, config {fp.short(b.get(key))}")
    return out


@dataclass
class RunIdentity:
    """What ties a checkpoint to its run: id, config (and its hash), data/teacher/cache fingerprints."""

    config: dict[str, Any]
    fingerprints: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_plain(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "config_sha256": config_sha256(self.config), "config": self.config,
                "fingerprints": self.fingerprints}

    def check_resume(self, saved: dict[str, Any] | None, path: Path) -> None:
        """Refuse a checkpoint of another config, data, teacher or cache; adopt its run id when it matches."""
        if not saved or "config" not in saved:
            raise RunFolderError(f"{path} records no run identity (written by an older mmkd or another tool), "
                                 "so it cannot be checked against this config; start again with --overwrite")
        diffs = config_differences(saved["config"], self.config)
        diffs += [f"fingerprint {d}" for d in fp.diff(saved.get("fingerprints") or {}, self.fingerprints,
                                                       names=("checkpoint", "now"))]
        if diffs:
            raise RunFolderError(
                f"{path} belongs to a run with another config or inputs, so --resume would mix two runs; differs: "
                f"{'; '.join(diffs[:6])}{' …' if len(diffs) > 6 else ''}. Only {', '.join(RESUMABLE_KEYS)} may "
                "change on resume; use the original config, or --overwrite to start this one afresh")
        self.run_id = str(saved.get("run_id") or self.run_id)


def data_fingerprint(paired: list[Any], unpaired: list[Any] | None) -> dict[str, Any]:
    """Keys + content digests (file sizes, in-memory bytes) and captions of the training records."""
    out = {}
    for name, recs in (("paired", paired), ("unpaired", unpaired or [])):
        out[name] = {"n": len(recs), "sha256": fp.data_sha256((r.key for r in recs), fp.record_digests(recs)),
                     "captions_sha256": fp.captions_sha256(c for r in recs for c in r.captions)}
    return out


# ----------------------------------------------------------------------------------------------------------
# what a folder holds


def found_run_files(out: Path) -> list[str]:
    """The run files in ``out`` (checkpoints named one by one, newest first), empty when it holds no run."""
    found = []
    for name in RUN_FILES:
        p = out / name
        if name == "checkpoints":
            found += [f"checkpoints/{c.name}" for c in sorted(p.glob("step-*.pt"), reverse=True)] if p.is_dir() else []
        elif p.exists():
            found.append(name)
    return found


def has_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob("step-*.pt")) if (out / "checkpoints").is_dir() else False


def _saved_config(out: Path) -> dict[str, Any] | None:
    import yaml

    try:
        loaded = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def plan_start(out: Path, cfg: RunConfig, resume: str, overwrite: bool) -> str:
    """Decide, before any compute, what this run does with ``out``: ``"fresh"``, ``"resume"`` or ``"replace"``.

    resume: ``no`` (start; refuse a folder holding another run), ``yes`` (continue; refuse a folder without a
    checkpoint) or ``auto`` (continue when there is a checkpoint, else as ``no``).
    """
    if resume not in RESUME_MODES:
        raise RunFolderError(f"--resume {resume!r}: expected one of {', '.join(RESUME_MODES)}")
    if overwrite and resume != "no":
        raise RunFolderError("--overwrite starts afresh and --resume continues: give one of them")
    if resume in ("yes", "auto") and has_checkpoint(out):
        return "resume"
    if resume == "yes":
        raise RunFolderError(f"{out / 'checkpoints'} holds no checkpoint, so there is nothing to resume; run "
                             "without --resume to start, or with --resume-or-start to start when there is none")
    found = found_run_files(out)
    if not found:
        return "fresh"
    if overwrite:
        return "replace"
    saved = _saved_config(out)
    if (saved is not None and not has_checkpoint(out) and not (out / "metrics.json").exists()
            and not config_differences(saved, run_config(cfg))):
        return "fresh"  # a start of this very config that died before its first checkpoint: nothing to keep
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise RunFolderError(f"{out} already holds a run ({shown}); continue it with --resume, or replace it with "
                         "--overwrite (the old run is moved aside to OUT.old-<time>, not deleted), or choose "
                         "another out")


def move_aside(out: Path) -> Path:
    """Rename ``out`` to ``out.old-<time>`` in one atomic rename (the old run is kept whole) and recreate it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = out.with_name(f"{out.name}.old-{stamp}-{n}")
    os.replace(out, dest)
    out.mkdir()
    return dest


class RunFolder:
    """Rank 0's lock on the run folder; a run that fails before it starts leaves no trace of itself there."""

    def __init__(self, out: Path, main: bool) -> None:
        self.out, self.main, self.started = out, main, False
        self.created = not out.exists()
        self.had_lock_file = (out / ".lock").exists()
        self.lock = FolderLock(out, "run folder").acquire() if main else None  # fails at once naming the holder

    def replace(self) -> Path:
        """Move the old run aside in one rename and lock the fresh folder in its place."""
        moved = move_aside(self.out)
        new = FolderLock(self.out, "run folder").acquire()
        if self.lock is not None:
            self.lock.release()
            (moved / ".lock").unlink(missing_ok=True)
        self.lock, self.had_lock_file = new, False
        return moved

    def close(self) -> None:
        if self.lock is None:
            return
        self.lock.release()
        if not self.started and not self.had_lock_file:
            (self.out / ".lock").unlink(missing_ok=True)
            if self.created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
