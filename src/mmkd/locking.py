"""One writer per folder: an advisory ``fcntl.flock`` on ``DIR/.lock``.

The kernel drops a flock when its holder dies (SIGKILL included), so a lock never outlives a crashed run and
needs no stale-lock clean-up. The holder writes its PID into the file so that a second writer can say who
holds the folder. Advisory: it guards mmkd against itself (two runs, two cache builds), not against other tools.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from mmkd.errors import MmkdError


class FolderLockedError(MmkdError, RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(dir, "run folder"):`` holds ``dir/.lock`` exclusively, or fails at once naming the holder."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / ".lock"

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderLockedError(
                f"{self.folder}: this {self.what} is in use by another mmkd process (PID {holder}); wait for it "
                "to finish or stop it, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
