"""One writer per folder: a second holder fails at once naming the first one's PID; a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mmkd.locking import FolderLock, FolderLockedError


def test_second_writer_fails_naming_the_holder(tmp_path):
    with FolderLock(tmp_path / "run", "run folder"):
        held = rf"run folder is in use by another mmkd process \(PID {os.getpid()}\)"
        with pytest.raises(FolderLockedError, match=held):
            FolderLock(tmp_path / "run", "run folder").acquire()
    FolderLock(tmp_path / "run").acquire().release()  # released on exit: free again


def test_lock_of_a_killed_process_is_free(tmp_path):
    code = ("import sys, time; from mmkd.locking import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=f"PID {proc.pid}"):
            FolderLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases a dead holder's flock when its file is closed
        try:
            FolderLock(tmp_path).acquire().release()
            break
        except FolderLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
