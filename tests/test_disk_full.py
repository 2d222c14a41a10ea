"""A full disk is a user's problem, not a crash (issue 19 item 8): every writer of checkpoints, students and teacher
caches fails in one line naming the file and "no space left on device" (exit 2), removes its temporary files and
folders, and leaves what it wrote before intact.

Real: a 2 MiB tmpfs (mounted as root; skipped with the reason where mounting is not permitted), filled so that the
write runs out mid-file. Always: the translation of each writer's own report (torch's zip writer loses the errno:
"unexpected pos"; safetensors says "No space left on device"; numpy's tofile "N requested and M written")."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mmkd import fileio
from mmkd.errors import MmkdError
from mmkd.fileio import DiskFullError, atomic_write, atomic_write_bytes

NO_SPACE = r"no space left on device while writing it"


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or ".part" in p.name)


# ------------------------------------------------------------------------------------------ always: translation


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("SafetensorError: Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                 "\"No space left on device\" })"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1366"),
    OSError("393216 requested and 159680 written"),
])
def test_each_writers_report_of_a_full_disk_becomes_one_line_naming_the_file(
        error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 0)  # the writers that lose the errno: no space left
    target = tmp_path / "step-00000002.pt"
    atomic_write_bytes(target, b"the earlier file")

    def write(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise error

    with pytest.raises(DiskFullError, match=rf"^{target}: {NO_SPACE} .*free space") as e:
        atomic_write(target, write)
    assert isinstance(e.value, MmkdError) and e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert target.read_bytes() == b"the earlier file" and _leftovers(tmp_path) == []


def test_a_short_write_with_space_left_is_not_called_a_full_disk(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 10 << 30)

    def write(f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1366")

    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "x.pt", write)
    assert _leftovers(tmp_path) == []


def test_a_student_save_that_fails_leaves_no_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import tiny_dual_encoder

    from mmkd.models import hub

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(hub, "save_file", full)
    with pytest.raises(DiskFullError, match=rf"student: {NO_SPACE}"):
        hub.save_dual_encoder(tiny_dual_encoder(), tmp_path / "student")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ real: a small tmpfs


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at tmp_path/small."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs); the translation tests above still run")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()[:200]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path, leave: int) -> None:
    """Fill the disk of ``folder`` but ``leave`` bytes."""
    st = os.statvfs(folder)
    free = st.f_frsize * st.f_bfree
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_checkpoint_write_on_a_full_disk(small_disk: Path) -> None:
    from mmkd.train.checkpoint import CheckpointManager, read_checkpoint

    ckpts = CheckpointManager(small_disk / "ckpt", keep=3)
    first = ckpts.save(1, {"model": {"w": torch.zeros(1000)}})
    _fill(small_disk, leave=64 << 10)
    with pytest.raises(DiskFullError, match=rf"step-00000002\.pt: {NO_SPACE}"):
        ckpts.save(2, {"model": {"w": torch.zeros(200_000)}})  # 800 kB
    assert _leftovers(small_disk) == [] and not ckpts.path(2).exists()
    assert (small_disk / "ckpt" / "latest").read_text() == first.name
    assert read_checkpoint(first)["step"] == 1  # the earlier checkpoint is intact


def test_student_save_on_a_full_disk(small_disk: Path) -> None:
    from conftest import tiny_dual_encoder

    from mmkd.models.hub import save_dual_encoder

    _fill(small_disk, leave=16 << 10)
    with pytest.raises(DiskFullError, match=rf"student: {NO_SPACE}"):
        save_dual_encoder(tiny_dual_encoder(width=64), small_disk / "student")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no .student.tmp-PID folder


@pytest.mark.parametrize("where", ["tokenizer", "arrays"])
def test_mmkd_cache_on_a_full_disk_is_exit_2_in_one_line(where: str, small_disk: Path, tiny_teacher_dir: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The disk fills while the teacher's tokenizer is saved, or later, while chunks of embeddings are written."""
    from tiny_runs import write_pairs

    from mmkd.cli import main

    pairs = write_pairs(tmp_path)
    args = ["cache", "--teacher", str(tiny_teacher_dir), "--data", f"jsonl:{pairs}", "--views", "16", "--features",
            "--dtype", "float32", "--chunk-rows", "8", "--threads", "1"]
    leave = 16 << 10
    if where == "arrays":  # room for the tokenizer and the settings, not for the arrays (~90 kB)
        assert main([*args, "--out", str(tmp_path / "ref")]) == 0
        leave += sum(p.stat().st_size for p in (tmp_path / "ref" / "tokenizer").iterdir()) + (32 << 10)
    capsys.readouterr()
    _fill(small_disk, leave=leave)
    out = small_disk / "tc"
    code = main([*args, "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and "teacher cache:" not in line]  # the progress bar
    assert code == 2 and len(lines) == 1, lines
    err = lines[0]
    assert err.startswith(f"mmkd: error: {out}/") and NO_SPACE in err, err
    assert ("/tokenizer:" in err) == (where == "tokenizer"), err
    assert _leftovers(small_disk) == []
    (small_disk / "filler").unlink()  # space freed: the same command completes the cache
    assert main([*args, "--out", str(out)]) == 0
