"""Atomic file writes: a reader sees the old file or the complete new one, never a partial file; and the one
JSONL line reader (errors name FILE:LINE).

Temporary files are named ``.<name>.tmp-<random>`` beside their target, so a folder's owner can sweep what a
killed writer left with the glob ``.*.tmp-*`` (the teacher cache and checkpoints do).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mmkd.errors import MmkdError


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can only set it, and
    setting it for a moment races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT, or a SIGTERM that ``mmkd`` handles as one) arriving inside the block until the block
    is done, then raise it.

    A KeyboardInterrupt raised inside ``torch.save`` leaves its zip writer half-finished, and the writer's own
    error ("unexpected pos") then replaces the interrupt: the user would see a crash instead of "interrupted,
    resume with --resume", with the last checkpoint not written. Only the main thread receives signals, so
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield  # no signals here: nothing to hold
        return
    # signals with a Python handler: Ctrl-C unless ignored (a background job), SIGTERM where `mmkd` raises on it
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(s))]
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        handler = previous[caught[0]]
        if handler is signal.default_int_handler or not callable(handler):
            raise KeyboardInterrupt
        handler(caught[0], None)  # the handler the signal would have met (mmkd's SIGTERM one raises an interrupt)


class DiskFullError(MmkdError, OSError):
    """No space left on the device while writing a file; the message names the file (exit 2, not a crash)."""


_NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")
# writers that report a failed write without its errno: torch's zip writer ("[enforce fail at
# inline_container.cc] . unexpected pos"), numpy's tofile ("393216 requested and 159680 written")
_SHORT_WRITE_WORDS = ("unexpected pos", "requested and", "PytorchStreamWriter failed")


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes this process may still write under ``folder`` (None where the file system cannot say)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)


def is_disk_full(e: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``e``, raised while writing under ``folder``, means the disk (or quota) is full. Call it before the
    partial file is removed: for writers that lose the errno, a folder with (nearly) no free space decides."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if any(w in text for w in _NO_SPACE_WORDS):
        return True
    if any(w in text for w in _SHORT_WRITE_WORDS):
        free = free_bytes(folder)
        return free is not None and free < (1 << 20)
    return False


def disk_full_error(path: str | os.PathLike, kept: str = "nothing was replaced") -> DiskFullError:
    """The one-line error for a write of ``path`` that ran out of space (its partial file already removed)."""
    e = DiskFullError(f"{path}: no space left on device while writing it ({kept}); free space on that disk (or "
                      "write to a folder on another disk) and rerun")
    e.errno = errno.ENOSPC
    return e


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable: a rename is only on disk once its directory is."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms (Windows) that cannot open a directory have nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse a directory fsync
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    """Write through ``write(f)`` into a temp file beside ``path``, fsync it, rename it into place, fsync the folder.

    The file gets the permissions ``open()`` would give it (0666 less the umask), not mkstemp's private 0600: a
    cache or run folder shared with a group stays readable by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, KeyboardInterrupt) and is_disk_full(e, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full_error(path, "the previous file, if any, is untouched") from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None: JSON has no NaN, and other readers refuse it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Valid JSON only (``allow_nan=False``): a non-finite number is written as null (see `json_safe`)."""
    safe = json_safe(obj)
    atomic_write(path, lambda f: json.dump(safe, f, indent=indent, ensure_ascii=False, allow_nan=False), mode="w")


class JsonLineError(MmkdError, ValueError):
    """A line of a JSONL file that is not one JSON object; the message names FILE:LINE."""


def read_jsonl(path: str | Path, what: str, error: Callable[[str], Exception] = JsonLineError
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``path`` (a leading BOM is ignored).

    what: the kind of file, for the message (``"a JSONL data file"``); error: the exception type a bad line
    raises (the caller's own, e.g. DataError), its message naming ``FILE:LINE`` and what is wrong.
    """
    with open(path, encoding="utf-8-sig") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{no}: not valid JSON ({e.msg} at column {e.colno}); each line of {what} "
                            "must be one JSON object") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{no}: expected a JSON object, got {type(obj).__name__}; each line of {what} "
                            "must be one JSON object")
            yield no, obj
