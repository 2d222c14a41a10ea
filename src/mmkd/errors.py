"""The base of every error a user can fix, so the CLI can tell them from bugs.

``mmkd`` prints an ``MmkdError`` (bad config, data, cache, model, a busy folder, a bad command-line option) as one
line and exits 2; anything else is a bug and is reported as one (exit 1, traceback with ``MMKD_DEBUG=1``). Each
subclass keeps the builtin base it always had (``ValueError``, ``RuntimeError``), so existing ``except`` clauses
still hold.
"""

from __future__ import annotations


class MmkdError(Exception):
    """A problem with the user's input or environment: the message names the file/key/sample and what to do."""


class UsageError(MmkdError, ValueError):
    """A bad command-line option or argument combination."""


class ConfigError(MmkdError, ValueError):
    """A bad configuration: the message names the key (dotted path) and what is allowed."""


class RunStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``cause``) stopped training after ``step`` optimizer steps finished in this process, so
    the command can say where a run stopped without reading the training loop's frame."""

    def __init__(self, step: int, cause: KeyboardInterrupt) -> None:
        super().__init__(step, cause)  # (the arguments, so that it pickles)
        self.step, self.cause = step, cause

    def __str__(self) -> str:
        return f"stopped after step {self.step}"
