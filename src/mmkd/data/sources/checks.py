"""Checks every reader shares, so each format words a missing file, a bad image path or an empty caption the
same way (naming the file and what to do)."""

from __future__ import annotations

from pathlib import Path

from mmkd.data.records import DataError


def existing_file(path: str | Path, what: str = "data file") -> Path:
    return _existing(path, what, folder=False)


def existing_dir(path: str | Path, what: str = "data folder") -> Path:
    return _existing(path, what, folder=True)


def _existing(path: str | Path, what: str, folder: bool) -> Path:
    p = Path(path).expanduser()
    if not (p.is_dir() if folder else p.is_file()):
        other = p.is_file() if folder else p.is_dir()
        hint = f" (it is a {'file' if folder else 'folder'})" if other else ""
        raise DataError(f"{what} {p} not found{hint}; check the path in your data spec")
    return p


def resolve_image(value: str, root: Path, origin: str, check: bool) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = root / p
    if check and not p.is_file():
        raise DataError(f"{origin}: image file {p} does not exist; fix the path (relative paths are "
                        f"resolved against {root}) or remove the entry")
    return p
