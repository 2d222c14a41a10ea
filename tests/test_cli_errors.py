"""The CLI never shows a user a traceback: one line naming the file and what to do (exit 2), Ctrl-C (exit 130),
bugs reported as bugs (exit 1, traceback with MMKD_DEBUG=1)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from conftest import tiny_dual_encoder, write_run_config
from PIL import Image
from tiny_runs import signal_after_first_checkpoint

import mmkd.commands.objectives
from mmkd.cli import main
from mmkd.locking import FolderLock
from mmkd.models.hub import save_dual_encoder
from mmkd.train.checkpoint import CheckpointManager


@pytest.fixture
def teacher(tmp_path: Path, minilm_path: str) -> Path:
    return save_dual_encoder(tiny_dual_encoder(minilm_path, layers=2), tmp_path / "teacher")


def run_config(tmp_path: Path, teacher: Path | str, data: str = "world:train", train: str = "steps: 2",
               extra: str = "") -> Path:
    return write_run_config(tmp_path, teacher, data=data, batch_size=4, data_extra=extra,
                            objectives="[{name: clip}, {name: fd_mse_cosine, towers: [image, text]}]",
                            train=f"{train}, log_every: 1, warmup_steps: 1")


def png(size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (20, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels: a few bytes on disk, gigabytes once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def jsonl(tmp_path: Path, images: dict[str, bytes]) -> Path:
    lines = []
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        lines.append(json.dumps({"image": name, "captions": [f"a picture called {name}"]}))
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


# ------------------------------------------------------------------------------------------------ bugs


def test_unexpected_exception_is_one_line_with_the_debug_hint(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("something inside mmkd broke")

    monkeypatch.setattr(mmkd.commands.objectives, "run", broken)
    monkeypatch.delenv("MMKD_DEBUG", raising=False)
    assert main(["objectives"]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) == ("mmkd: internal error: RuntimeError: something inside mmkd broke "
                                   "(rerun with MMKD_DEBUG=1 for the traceback)")
    monkeypatch.setenv("MMKD_DEBUG", "1")
    assert main(["objectives"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise RuntimeError("something inside mmkd broke")' in err


def test_a_bug_raising_keyerror_is_not_mistaken_for_bad_input(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Before: every KeyError/ValueError became `mmkd: error: 'x'` with exit 2, as if the user were at fault."""
    monkeypatch.setattr(mmkd.commands.objectives, "run", lambda args: {}["layout"])
    assert main(["objectives"]) == 1
    assert "internal error: KeyError: 'layout'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ OS errors


def test_permission_denied_on_the_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "run"
    if os.geteuid() != 0:
        locked.chmod(0o500)
    else:  # root ignores permissions: refuse the folder as a file system would
        real_mkdir = Path.mkdir

        def mkdir(self: Path, *args: object, **kwargs: object) -> None:
            if self == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "mkdir", mkdir)
    cfg = run_config(tmp_path, teacher)  # (every input path is checked first: the teacher must exist)
    try:
        assert main(["distill", str(cfg), f"out={out}"]) == 2
    finally:
        locked.chmod(0o700)
    line = one_error_line(capsys.readouterr().err)
    assert line == f"mmkd: error: {out}: Permission denied; check its permissions or choose another folder"


def test_disk_full_is_named_with_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def full(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/step-00000100.pt")

    monkeypatch.setattr(mmkd.commands.objectives, "run", full)
    assert main(["objectives"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "mmkd: error: /data/run/checkpoints/step-00000100.pt: No space left on device; the disk is full: free "
        "space or choose a folder on another disk")


# ------------------------------------------------------------------------------------------------ damaged files


def test_damaged_cache_meta_json_names_the_file_and_the_key(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "tcache"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"format": "mmkd-teacher-cache", "format_version": 2,
                                                 "fingerprint": {}}))
    cfg = run_config(tmp_path, f"cache:{cache}")
    assert main(["distill", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{cache / 'meta.json'} has no key 'layout.chunk_rows'" in line and "rebuild the cache" in line
    assert main(["cache", "--verify", str(cache)]) == 1
    assert "meta.json has no key 'layout.chunk_rows'" in capsys.readouterr().err
    # a cache of the old format (version 1: one folder of chunks, keys.json) is refused in one line: rebuild it
    (cache / "meta.json").write_text(json.dumps({"format": "mmkd-teacher-cache", "format_version": 1}))
    assert main(["distill", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "format version 1" in line and "rebuild it with `mmkd cache`" in line


@pytest.mark.parametrize("side", [10_000, 30_000])  # PIL warns above 89 M pixels, refuses above 179 M
def test_decompression_bomb_is_a_data_error_naming_the_file(tmp_path: Path, teacher: Path, side: int,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path, {"ok.png": png(), "bomb.png": bomb_png(side, side)})
    assert main(["eval", "retrieval", "--model", str(teacher), "--data", f"jsonl:{data}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{data}:2: image {tmp_path / 'bomb.png'}" in line and "decompression-bomb guard" in line
    assert "data.max_image_pixels" in line and "MMKD_MAX_IMAGE_PIXELS" in line


def test_pixel_limit_is_configurable(tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path, {f"i{i}.png": png((40, 30), (i * 30, 0, 0)) for i in range(4)})
    monkeypatch.setenv("MMKD_MAX_IMAGE_PIXELS", "1000")
    assert main(["eval", "retrieval", "--model", str(teacher), "--data", f"jsonl:{data}"]) == 2
    assert "i0.png is too large (Image size (1200 pixels) exceeds limit of 1000 pixels" in capsys.readouterr().err
    monkeypatch.setenv("MMKD_MAX_IMAGE_PIXELS", "1200")
    assert main(["eval", "retrieval", "--model", str(teacher), "--data", f"jsonl:{data}"]) == 0
    monkeypatch.delenv("MMKD_MAX_IMAGE_PIXELS")
    cfg = run_config(tmp_path, teacher, data=f"jsonl:{data}", extra=", max_image_pixels: 1199")
    capsys.readouterr()
    assert main(["distill", str(cfg)]) == 2
    assert "over the limit of 1199 pixels" in capsys.readouterr().err
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # a command's limit ends with it


def test_label_out_of_range_names_the_sample(tmp_path: Path, teacher: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with tarfile.open(tmp_path / "c-0.tar", "w") as tf:
        for key, label in (("a", b"0"), ("b", b"5"), ("c", b"1")):
            for ext, data in (("png", png()), ("cls", label)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    assert main(["eval", "zeroshot", "--model", str(teacher), "--data", f"wds:{tmp_path}/c-0.tar"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "c-0.tar:b: label 5 is out of range: the data has 2 classes" in line


def test_negative_limit_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "retrieval", "--model", "m", "--data", "world:test", "--limit", "-5"])
    assert e.value.code == 2 and "--limit: must be ≥ 1, got -5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ data.on_error


def test_on_error_skip_counts_bad_samples_in_metrics_json(tmp_path: Path, teacher: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    members: dict[str, bytes] = {}
    for i in range(9):
        members[f"s{i}.png"] = png(colour=(i * 25, 50, 50))
        if i != 4:
            members[f"s{i}.txt"] = f"sample {i}".encode()
    with tarfile.open(tmp_path / "d-0.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cfg = run_config(tmp_path, teacher, data=f"wds:{tmp_path}/d-0.tar")
    assert main(["distill", str(cfg)]) == 2
    assert "d-0.tar:s4: no caption" in one_error_line(capsys.readouterr().err)
    assert main(["distill", str(cfg), "data.on_error=skip"]) == 0
    assert "left out 1 bad sample(s); first: " in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"] == {"on_error": "skip", "skipped": 1}


# ------------------------------------------------------------------------------------------------ mmkd cache


def cache_args(data: Path, out: Path, teacher: str) -> list[str]:
    return ["cache", "--teacher", teacher, "--data", f"jsonl:{data}", "--out", str(out), "--chunk-rows", "2",
            "--precision", "fp32"]


def test_cache_resumes_whether_the_teacher_is_named_relatively_or_absolutely(
        tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path, {f"i{i}.png": png(colour=(i * 40, 9, 9)) for i in range(5)})
    out = tmp_path / "tcache"
    monkeypatch.chdir(tmp_path)
    assert main(cache_args(data, out, "teacher")) == 0
    (out / "segments" / "memory" / "image-00002.done.json").unlink()  # as if killed before its last chunk
    capsys.readouterr()
    assert main(cache_args(data, out, str(teacher))) == 0
    assert "1 chunk(s) written" in capsys.readouterr().out
    assert main(["cache", "--verify", str(out)]) == 0


def test_a_failed_first_cache_build_does_not_refuse_the_corrected_rerun(
        tmp_path: Path, teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path, {"a.png": png(), "b.png": b"this is not a picture"})
    out = tmp_path / "tcache"
    assert main(cache_args(data, out, str(teacher))) == 2
    assert f"cannot read image {tmp_path / 'b.png'}" in one_error_line(capsys.readouterr().err)
    (tmp_path / "b.png").write_bytes(png((12, 12)))  # the user fixes the data: another fingerprint
    assert main(cache_args(data, out, str(teacher))) == 0
    assert main(["cache", "--verify", str(out)]) == 0


def test_a_second_cache_build_into_a_busy_folder_fails_at_once_naming_the_holder(
        tmp_path: Path, teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path, {f"i{i}.png": png(colour=(i * 40, 9, 9)) for i in range(3)})
    out = tmp_path / "tcache"
    with FolderLock(out, "teacher cache folder"):
        (out / "segments" / "memory").mkdir(parents=True)
        in_progress = out / "segments" / "memory" / ".image-00000.image_embeds.npy.tmp-x1"  # the holder's write
        in_progress.write_bytes(b"partial")
        assert main(cache_args(data, out, str(teacher))) == 2
        assert f"in use by another mmkd process (PID {os.getpid()})" in one_error_line(capsys.readouterr().err)
        assert in_progress.read_bytes() == b"partial"
    in_progress.unlink()
    assert main(cache_args(data, out, str(teacher))) == 0


# ------------------------------------------------------------------------------------------------ Ctrl-C


@pytest.mark.slow
def test_ctrl_c_stops_distill_with_130_and_leaves_a_loadable_checkpoint(tmp_path: Path, teacher: Path) -> None:
    cfg = run_config(tmp_path, teacher, train="steps: 100000, ckpt_every: 2")
    # a shell's background job inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # give the child the default disposition, as a terminal's foreground process has
    folder = tmp_path / "run" / "checkpoints"
    code, err = signal_after_first_checkpoint(cfg, folder, signal.SIGINT, default_sigint=True)
    assert code == 130, err
    match = re.search(r"mmkd: interrupted at step (\d+); resume with --resume", err)
    assert match and "Traceback" not in err, err
    state = CheckpointManager(folder).load_latest()
    assert state is not None and 2 <= int(state["step"]) <= int(match.group(1))
