"""Bad data and faulty files below the CLI: WebDataset members and truncated shards, data.on_error, limits,
duplicate YAML keys, atomic writes' permissions."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import write_tar
from PIL import Image

from mmkd.config import ConfigError, load_config
from mmkd.config_io import load_yaml
from mmkd.data.records import BadSamples, DataError
from mmkd.data.sources import read_records
from mmkd.fileio import atomic_write_text


def png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()





def captioned(n: int, start: int = 0) -> dict[str, bytes]:
    out = {}
    for i in range(start, start + n):
        out[f"s{i:03d}.png"] = png((10 * i % 256, 40, 90))
        out[f"s{i:03d}.txt"] = f"sample number {i}".encode()
    return out


def member_offsets(path: Path) -> dict[str, int]:
    """Byte offset of each member's header: cutting there leaves a tar that tarfile reads without complaint."""
    with tarfile.open(path) as tf:
        return {m.name: m.offset for m in tf}


# ------------------------------------------------------------------------------------------------ WebDataset


def test_sample_missing_its_caption_is_named_by_shard_and_key(tmp_path: Path) -> None:
    members = captioned(3)
    members["s001.txt"] = None  # type: ignore[assignment]
    tar = write_tar(tmp_path / "shard-0.tar", {k: v for k, v in members.items() if v is not None})
    with pytest.raises(DataError, match=r"shard-0.tar:s001: no caption .*other samples have one.*found: png"):
        read_records(f"wds:{tar}")
    bad = BadSamples("skip")
    recs = read_records(f"wds:{tar}", bad=bad)
    assert [r.key for r in recs] == ["s000", "s002"] and bad.count == 1 and "s001" in bad.skipped[0]


def test_sample_missing_its_label_in_a_classification_set_is_named(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    tar = write_tar(tmp_path / "c-0.tar", {"a.png": png(), "a.cls": b"1", "b.png": png(), "c.png": png(),
                                          "c.cls": b"0"})
    with pytest.raises(DataError, match=r"c-0.tar:b: no .cls label.*classification set"):
        read_records(f"wds:{tar}")
    bad = BadSamples("skip")
    assert [r.label for r in read_records(f"wds:{tar}", bad=bad)] == [1, 0] and bad.count == 1


@pytest.mark.parametrize("cut", ["last_member", "end_marker"])
def test_shard_cut_on_a_block_boundary_is_reported(tmp_path: Path, cut: str) -> None:
    """A cut on a 512-byte boundary reads as a clean, shorter tar: the last sample would silently lose its
    caption (last_member) or nothing would show the file is short (end_marker)."""
    full = write_tar(tmp_path / "full.tar", captioned(4))
    data = full.read_bytes()
    if cut == "last_member":
        end = member_offsets(full)["s003.txt"]  # s003 keeps its image, loses its caption
    else:
        with tarfile.open(full) as tf:
            last = tf.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512  # every member complete, no end-of-archive blocks
    assert end % 512 == 0
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:end])
    with tarfile.open(shard) as tf:  # what made this silent: tarfile reads it without an error
        assert len(tf.getmembers()) == (7 if cut == "last_member" else 8)
    with pytest.raises(DataError, match=r"cut.tar:s003: the shard ends without tar's end-of-archive marker"):
        read_records(f"wds:{shard}")
    bad = BadSamples("skip")
    recs = read_records(f"wds:{shard}", bad=bad)
    assert [r.key for r in recs] == ["s000", "s001", "s002"] and bad.count == 1
    assert all(r.captions for r in recs)
    assert len(read_records(f"wds:{full}")) == 4  # an intact shard is untouched by the check


def test_shard_cut_inside_a_member_keeps_the_samples_before_it_when_skipping(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", captioned(3))
    shard = tmp_path / "cut.tar"
    shard.write_bytes(full.read_bytes()[:member_offsets(full)["s002.png"] + 512 + 10])  # mid-data of s002.png
    with pytest.raises(DataError, match=r"cut.tar:s002"):
        read_records(f"wds:{shard}")
    bad = BadSamples("skip")
    assert [r.key for r in read_records(f"wds:{shard}", bad=bad)] == ["s000", "s001"] and bad.count == 1


# ------------------------------------------------------------------------------------------------ config


def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("key", ["limit", "unpaired_limit", "max_image_pixels", "world_size_train"])
def test_negative_data_limits_are_refused_naming_the_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.{key} must be ≥ 1"):
        load_config(_config(tmp_path, f"data: {{{key}: -3}}\n"))


def test_on_error_takes_raise_or_skip(tmp_path: Path) -> None:
    assert load_config(_config(tmp_path, "data: {on_error: skip}\n")).data.on_error == "skip"
    with pytest.raises(ConfigError, match=r"data\.on_error: 'ignore' is not one of raise, skip"):
        load_config(_config(tmp_path, "data: {on_error: ignore}\n"))


def test_duplicate_yaml_key_is_refused_naming_key_and_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "train:\n  steps: 10\n  lr: 1e-3\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: duplicate key 'steps' \(first given at line 2\)"):
        load_config(cfg)
    assert load_yaml("a: {b: 1}\nc: [1, 2]\n") == {"a": {"b": 1}, "c": [1, 2]}  # the same key in two maps is fine
    assert load_yaml("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


# ------------------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_open_would(tmp_path: Path, umask: int, mode: int) -> None:
    """mkstemp makes files 0600: a shared cache or run folder would be unreadable by the group."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        with open(tmp_path / "plain", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    got = stat.S_IMODE((tmp_path / "f.json").stat().st_mode)
    assert got == mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    if umask == 0o022:
        assert got & stat.S_IRGRP and got & stat.S_IROTH


def test_one_jsonl_reader_names_file_and_line_for_data_pairs_and_metrics(tmp_path: Path) -> None:
    """Data files, matching pair files and training logs are read by fileio.read_jsonl: blank lines and a BOM
    are fine; a line that is not one JSON object is named FILE:LINE, with each caller's own error type."""
    from mmkd.errors import UsageError
    from mmkd.fileio import JsonLineError, read_jsonl
    from mmkd.report.collect import _curve
    from mmkd.studies.matching.pairfile import meta_path, read_pairs

    f = tmp_path / "x.jsonl"
    f.write_text('\ufeff{"a": 1}\n\n  \n{"a": 2}\n', encoding="utf-8")
    assert list(read_jsonl(f, "a test file")) == [(1, {"a": 1}), (4, {"a": 2})]
    for bad, why in (('{"a": ', "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")):
        f.write_text("\n" + bad + '\n{"a": 1}\n')  # first, as each caller checks its fields line by line
        with pytest.raises(JsonLineError, match=rf"x\.jsonl:2: {why}.*each line of a test file"):
            list(read_jsonl(f, "a test file"))
        with pytest.raises(DataError, match=rf"x\.jsonl:2: {why}"):
            read_records(f"jsonl:{f}")
        meta_path(f).write_text('{"data": "world:train"}')
        with pytest.raises(DataError, match=rf"x\.jsonl:2: {why}.*a pair file"):
            read_pairs(f)
        with pytest.raises(UsageError, match=rf"x\.jsonl:2: {why}.*a metrics log"):
            _curve("student", f)
