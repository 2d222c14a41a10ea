"""Atomic, resumable checkpoints: a kill at any instant leaves the last complete checkpoint usable.

Each checkpoint is written to a temporary file, flushed to disk, then renamed into place; ``latest`` is a
small pointer file replaced the same way only after the checkpoint it names is complete. Resume trusts the
pointer, and falls back to the newest checkpoint that loads if the pointer or its target is damaged.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.fileio import atomic_write, atomic_write_bytes

CKPT_RE = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class CheckpointManager:
    def __init__(self, folder: str | os.PathLike, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives (whether or not it was written)."""
        return self.folder / f"step-{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".step-*.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        path = self.path(step)
        atomic_write(path, lambda f: torch.save({"step": step, "rng": rng_state(), **state}, f))
        atomic_write_bytes(self.folder / "latest", path.name.encode())
        self._prune()
        return path

    def _all(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if CKPT_RE.match(p.name)]
        return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def _prune(self) -> None:
        for old in self._all()[: -self.keep]:
            old.unlink(missing_ok=True)

    def load_latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint, or None when there is none."""
        candidates = self._all()[::-1]
        pointer = self.folder / "latest"
        if pointer.is_file():
            named = self.folder / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # a damaged file (disk full, external truncation): try the previous one
                continue
        return None
