"""data.crop_scale: the crop's area range of augmented views, a typed key refused outside 0 < lo ≤ hi ≤ 1, used by
online views and by `mmkd cache` (--config or --crop-scale), and part of a teacher cache's fingerprint, so a run
asking another range refuses the cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_run_config

from mmkd.cli import main
from mmkd.config import ConfigError, config_from_dict, load_config
from mmkd.data.transforms import random_resized_crop_box
from mmkd.dist import DistInfo
from mmkd.teacher.cache import CachedTeacher, CacheFingerprintError
from mmkd.teacher_spec import cache_value

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_STUDENT = ["student.vision={source: new, arch: clip_vision, config: {image_size: 32, patch_size: 8, "
               "hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}",
               "student.text={source: new, arch: bert, config: {hidden_size: 32, num_hidden_layers: 1, "
               "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}"]


def quiet(*_: Any) -> None:
    return None


@pytest.mark.parametrize("bad", [[0.0, 1.0], [0.7, 0.5], [0.5, 1.2], [0.5], [0.2, 0.5, 1.0], [-0.1, 0.5]])
def test_bad_ranges_are_refused_naming_the_key(bad: list[float]) -> None:
    with pytest.raises(ConfigError, match=r"data.crop_scale must be \[lo, hi\] with 0 < lo ≤ hi ≤ 1"):
        config_from_dict({"data": {"augment": True, "crop_scale": bad}})
    with pytest.raises(ConfigError, match="data.crop_scale"):
        config_from_dict({"data": {"crop_scale": "wide"}})


def test_default_and_accepted_ranges() -> None:
    assert config_from_dict({}).data.crop_scale is None
    assert config_from_dict({"data": {"crop_scale": [0.35, 1]}}).data.crop_scale == [0.35, 1.0]
    assert config_from_dict({"data": {"crop_scale": [1, 1]}}).data.crop_scale == [1.0, 1.0]


def test_crop_boxes_respect_the_range() -> None:
    rng = np.random.default_rng(0)
    for lo, hi in ((0.35, 1.0), (0.9, 1.0), (0.2, 0.3)):
        fractions = []
        for _ in range(300):
            x0, y0, x1, y1 = random_resized_crop_box(64, 48, (lo, hi), (3 / 4, 4 / 3), rng)
            fractions.append((x1 - x0) * (y1 - y0) / (64 * 48))
        # rounding the box to whole pixels moves its area by at most a row and a column
        assert min(fractions) >= lo - (64 + 48) / (64 * 48) and max(fractions) <= hi + (64 + 48) / (64 * 48)
        assert max(fractions) - min(fractions) > (hi - lo) / 2  # the range is used, not one value


def test_online_views_use_the_configured_range(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    from mmkd.run_setup import prepare

    cfg = write_run_config(tmp_path, str(tiny_teacher_dir), world_size=8,
                           data_extra=", augment: true, crop_scale: [0.25, 0.5]")
    data = prepare(load_config(cfg, ["student.vision.keep_layers=[0]"]), DistInfo(), quiet).data
    assert data.paired.train_tf.cfg.scale == (0.25, 0.5)
    assert data.teacher_banks is not None and data.teacher_banks[0].train_tf.cfg.scale == (0.25, 0.5)
    default = prepare(load_config(cfg, ["student.vision.keep_layers=[0]", "data.crop_scale=null"]), DistInfo(),
                      quiet).data
    assert default.paired.train_tf.cfg.scale == (0.6, 1.0)


@pytest.fixture(scope="module")
def crop_caches(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Any]:
    """Two 2-view caches of the same data and teacher, one built with --crop-scale 0.3,0.5 and one with the
    --config's data.crop_scale [0.9, 1], and the run config of each."""
    root = tmp_path_factory.mktemp("crops")
    out: dict[str, Any] = {}
    for name, crop, flag in (("narrow", None, ["--crop-scale", "0.3,0.5"]), ("wide", "[0.9, 1.0]", [])):
        d = root / name
        (d / "build").mkdir(parents=True)
        extra = ", augment: true" + (f", crop_scale: {crop}" if crop else ", crop_scale: [0.3, 0.5]")
        cfg = write_run_config(d, f"cache:{d / 'tc'}", world_size=8, data_extra=extra,
                               objectives="[{name: fd_mse_cosine}]")
        build = write_run_config(d / "build", f"cache:{d / 'tc'}", world_size=8,
                                 data_extra=f", augment: true{f', crop_scale: {crop}' if crop else ''}")
        assert main(["cache", "--config", str(build), "--teacher", str(tiny_teacher_dir), "--views", "2",
                     "--chunk-rows", "8", "--threads", "1", *flag]) == 0
        out[name] = {"config": cfg, "cache": d / "tc"}
    return out


def test_the_range_is_part_of_the_cache_fingerprint(crop_caches: dict[str, Any]) -> None:
    narrow, wide = (CachedTeacher.open(crop_caches[n]["cache"]).info for n in ("narrow", "wide"))
    assert narrow.augmentation["scale"] == [0.3, 0.5] and wide.augmentation["scale"] == [0.9, 1.0]
    assert narrow.fingerprint_sha256 != wide.fingerprint_sha256
    assert dict(narrow.augmentation, scale=None) == dict(wide.augmentation, scale=None)  # nothing else differs


def test_a_run_asking_another_range_refuses_the_cache(crop_caches: dict[str, Any]) -> None:
    from mmkd.run_setup import prepare

    narrow, wide = crop_caches["narrow"], crop_caches["wide"]
    cfg = load_config(narrow["config"], NEW_STUDENT)  # asks [0.3, 0.5]: its own cache is accepted
    data = prepare(cfg, DistInfo(), quiet).data
    assert data.paired.train_tf.cfg.scale == (0.3, 0.5)
    with pytest.raises(CacheFingerprintError, match=r"transform.augmentation.scale: cache \[0.9, 1.0\], training "
                                                    r"\[0.3, 0.5\]"):
        prepare(dataclasses.replace(cfg, teacher=cache_value(wide["cache"])), DistInfo(), quiet)
    # without data.crop_scale a run replays the cache's own range
    unset = dataclasses.replace(cfg, teacher=cache_value(wide["cache"]),
                                data=dataclasses.replace(cfg.data, crop_scale=None))
    assert prepare(unset, DistInfo(), quiet).data.paired.train_tf.cfg.scale == (0.9, 1.0)


def test_cache_cli_refuses_a_bad_flag_and_two_ranges(crop_caches: dict[str, Any], tiny_teacher_dir: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0,1", "0.8,0.5", "x,1", "0.5"):
        assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", "world:train", "--world-n", "4",
                     "--data-cache", str(tmp_path / "world"), "--out", str(tmp_path / "tc"), "--views", "2",
                     "--crop-scale", bad]) == 2
        assert f"--crop-scale '{bad}': give LO,HI with 0 < LO ≤ HI ≤ 1" in capsys.readouterr().err
    assert not (tmp_path / "tc").exists()
    build = crop_caches["wide"]["cache"].parent / "build" / "run.yaml"
    assert main(["cache", "--config", str(build), "--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "tc"),
                 "--crop-scale", "0.5,1"]) == 2
    assert "either with --crop-scale or through --config's data.crop_scale" in capsys.readouterr().err
    assert not (tmp_path / "tc").exists()


def test_cache_hflip_flag_is_stored_and_fingerprinted(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    common = ["cache", "--teacher", str(tiny_teacher_dir), "--data", "world:train", "--world-n", "4", "--data-cache",
              str(tmp_path / "world"), "--views", "2", "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "flip"), "--hflip", "--crop-scale", "0.5,1"]) == 0
    assert main([*common, "--out", str(tmp_path / "plain"), "--crop-scale", "0.5,1"]) == 0
    flip, plain = (CachedTeacher.open(tmp_path / n).info for n in ("flip", "plain"))
    assert flip.augmentation["hflip"] is True and plain.augmentation["hflip"] is False
    assert flip.augmentation["scale"] == plain.augmentation["scale"] == [0.5, 1.0]
    assert flip.fingerprint_sha256 != plain.fingerprint_sha256


def test_mmkd_cache_set_changes_the_configs_keys_and_needs_a_config(tmp_path: Path, tiny_teacher_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`mmkd cache --config CONFIG --set KEY=VALUE`: the cache of a variant of a config (a smaller world, another
    crop range) without copying the file; a key that does not exist, or --set without --config, is one line."""
    cfg = write_run_config(tmp_path, f"cache:{tmp_path / 'tc'}", world_size=16, data_extra=", augment: true")
    common = ["--teacher", str(tiny_teacher_dir), "--views", "2", "--chunk-rows", "8", "--threads", "1"]
    assert main(["cache", "--config", str(cfg), "--set", "data.world_size_train=8", "--set",
                 "data.crop_scale=[0.5, 1.0]", *common]) == 0
    built = CachedTeacher.open(tmp_path / "tc")
    assert built.n_samples == 8 and built.info.augmentation["scale"] == [0.5, 1.0]
    capsys.readouterr()
    assert main(["cache", "--config", str(cfg), "--set", "data.no_such_key=1", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.no_such_key" in err and "\n" not in err
    assert main(["cache", "--data", "world:train", "--set", "data.limit=3", "--out", str(tmp_path / "x"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "--set data.limit=3: --set changes a key of --config's run config" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
