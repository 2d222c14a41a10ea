"""Every failure of a command as one line on stderr and an exit status; no traceback reaches a user."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

from mmkd.errors import MmkdError, RunStopped

DEBUG_ENV = "MMKD_DEBUG"

# what to do about an OSError, by errno: the file is named from the error itself
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another folder",
    errno.EACCES: "check its permissions or choose another folder",
    errno.EPERM: "check its permissions or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.EBUSY: "it is in use by another program: close that program or choose another path",
    errno.ETXTBSY: "it is in use by another program: close that program or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
    errno.ENAMETOOLONG: "shorten the path",
    errno.EIO: "the disk reported an I/O error: check the disk and rerun",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file(s), the system's reason and what to do."""
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e)
    hint = _OS_HINTS.get(e.errno or -1, "check the path and rerun")
    return f"{where + ': ' if where else ''}{reason}; {hint}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send), raised where Ctrl-C would be, so it ends a run the same way:
    the checkpoint being written is finished first (``ctrl_c_deferred``), then one line, and ``--resume`` works."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises `Terminated` (main thread only: only it receives signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_progress_bars() -> None:
    """Close every open tqdm bar, so that the one-line message starts a line of its own (an interrupted bar
    leaves the cursor at its end)."""
    module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(module, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command, turning every failure into one line on stderr and an exit status.

    2: a problem the user can fix (an ``MmkdError`` or an ``OSError``); 130: Ctrl-C; 143: SIGTERM; 1: anything
    else (a bug), with its traceback when ``MMKD_DEBUG=1``.
    """
    import warnings

    from PIL import Image

    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    pixel_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # the command's image limit and warning filter end with the command
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse before decoding, not after
            from mmkd.data.records import max_image_pixels_from_env, set_max_image_pixels

            set_max_image_pixels(max_image_pixels_from_env())
            if getattr(args, "cli_plugins", None):  # `mmkd --plugin MODULE …`: registered before anything is read
                from mmkd.plugin_modules import import_plugins

                import_plugins(args.cli_plugins, key="--plugin")
            with sigterm_as_interrupt():
                return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        end_progress_bars()
        stopped = e if isinstance(e, RunStopped) and getattr(args, "command", None) == "distill" else None
        cause = e.cause if isinstance(e, RunStopped) else e
        what = "terminated (SIGTERM)" if isinstance(cause, Terminated) else "interrupted"
        print(f"mmkd: {what}" + (f" at step {stopped.step}; resume with --resume" if stopped is not None else ""),
              file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(cause, Terminated) else 130
    except (MmkdError, OSError) as e:
        end_progress_bars()
        if debug:
            traceback.print_exc()
        msg = str(e) if isinstance(e, MmkdError) else os_error_message(e)
        print(f"mmkd: error: {_one_line(msg)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, the traceback on request
        end_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"mmkd: internal error: {type(e).__name__}: {_one_line(str(e))} "
              f"(rerun with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        Image.MAX_IMAGE_PIXELS = pixel_limit
