"""Atomic, resumable checkpoints that hold tensors and plain data only.

Each checkpoint is written to a temporary file, flushed to disk, then renamed into place; ``latest`` is a
small pointer file replaced the same way only after the checkpoint it names is complete. Files are read
with ``torch.load(weights_only=True)``, so a checkpoint planted in a run folder cannot run code: it is
reported as damaged. RNG states are stored as tensors and lists for the same reason.

Each checkpoint records the run it belongs to (``run.run_id``): rotation deletes only checkpoints it has
read and found to be its own run's, never a file it cannot read or another run's.
"""

from __future__ import annotations

import pickle
import random
import re
import sys
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.data.records import DataError
from mmkd.fileio import atomic_write, atomic_write_bytes, ctrl_c_deferred

CKPT_RE = re.compile(r"^step-(\d+)\.pt$")
# what torch.load raises on a truncated, garbled or code-carrying (refused by weights_only) file
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
               AttributeError, IndexError, TypeError)


class CheckpointError(DataError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


def _warn(message: str) -> None:
    print(f"mmkd: warning: {message}", file=sys.stderr)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path, mmap: bool = False) -> Any:
    with warnings.catch_warnings():  # torch warns about unusual pickle protocols before refusing them
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint, validated; CheckpointError naming the file when it is damaged or not a checkpoint."""
    try:
        state = _load(path)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: not a file of tensors and plain data (damaged, or it holds objects whose "
                              "loading could run code; refused without loading them)") from None
    except LOAD_ERRORS as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise CheckpointError(f"{path}: damaged or truncated ({type(e).__name__}: {first})") from None
    m = CKPT_RE.match(path.name)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or (
            m is not None and int(m.group(1)) != state["step"]):
        raise CheckpointError(f"{path}: not an mmkd checkpoint (no step, or a step other than its name's)")
    return state


class CheckpointManager:
    """Save, choose and rotate the checkpoints of ONE run (``run_id``) in ``folder``."""

    def __init__(self, folder: str | Path, keep: int = 2, run_id: str | None = None,
                 warn: Callable[[str], None] = _warn) -> None:
        self.folder = Path(folder)
        self.keep = max(1, keep)
        self.run_id = run_id or uuid.uuid4().hex
        self.warn = warn
        self._owner: dict[Path, bool] = {}  # checkpoints known to be (True) or not be (False) this run's

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives (whether or not it was written)."""
        return self.folder / f"step-{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (with ``step``, this run's id and, unless given, this process's RNG) atomically, point
        ``latest`` at it, rotate."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".step-*.tmp-*"):  # left by a run killed mid-write (the folder is locked)
            stale.unlink(missing_ok=True)
        path = self.path(step)
        run = {**state.get("run", {}), "run_id": self.run_id}
        full = {"rng": rng_state(), **state, "step": step, "run": run}  # this process's RNG unless given
        with ctrl_c_deferred():  # a Ctrl-C mid-write is honoured once the checkpoint and `latest` are whole
            atomic_write(path, lambda f: torch.save(full, f))
            self._owner[path] = True
            atomic_write_bytes(self.folder / "latest", path.name.encode())
        self._prune()
        return path

    def all(self) -> list[Path]:
        """Every ``step-N.pt`` in the folder, oldest step first (any run's, readable or not)."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if CKPT_RE.match(p.name)]
        return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def _owns(self, path: Path) -> bool:
        if path not in self._owner:
            try:  # mmap: reads the small run record without pulling every tensor into memory
                state = _load(path, mmap=True)
                owned = isinstance(state, dict) and (state.get("run") or {}).get("run_id") == self.run_id
            except LOAD_ERRORS:
                owned = False  # unreadable: never ours to delete
            self._owner[path] = owned
        return self._owner[path]

    def _prune(self) -> None:
        own = [p for p in self.all() if self._owns(p)]
        for old in own[: -self.keep]:
            old.unlink(missing_ok=True)
            self._owner.pop(old, None)

    def choose(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, with its state; None when the folder holds no checkpoint.

        A damaged newer checkpoint is skipped only with a warning naming it and the one used instead; when
        every checkpoint is damaged, CheckpointError names them all. Adopts the chosen run's id.
        """
        candidates = self.all()[::-1]
        if not candidates:
            return None
        damaged: list[str] = []
        for path in candidates:
            try:
                state = read_checkpoint(path)
            except CheckpointError as e:
                damaged.append(str(e))
                continue
            if damaged:
                self.warn(f"{'; '.join(damaged)}; resuming from the older complete checkpoint {path} instead")
            run_id = (state.get("run") or {}).get("run_id")
            if isinstance(run_id, str):
                self.run_id = run_id
            self._owner[path] = True
            return path, state
        raise CheckpointError(f"no usable checkpoint in {self.folder}: {'; '.join(damaged)}. Start the run again "
                              "with --overwrite (the old run is moved aside, not deleted)")

    def load_latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's state, or None when there is none (see ``choose``)."""
        chosen = self.choose()
        return chosen[1] if chosen is not None else None
