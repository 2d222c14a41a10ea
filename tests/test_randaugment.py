"""RandAugment on augmented views: each op against a direct numpy computation, views that stay pure functions of
(seed, key, view), the teacher seeing the student's pixels (online and replayed from a cache), caches refused
across RandAugment settings, and the cache's bytes per sample."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_run_config
from PIL import Image

from mmkd.cli import main
from mmkd.config import ConfigError, RandAugmentConfig, config_from_dict, load_config
from mmkd.data import randaugment as ra
from mmkd.data.batches import ImageBank
from mmkd.data.records import Record
from mmkd.data.transforms import (
    TRANSFORM_VERSION,
    ImageTransform,
    TransformConfig,
    apply_view_pixels,
    augmentation_settings,
    crop_resize,
    random_resized_crop_box,
    view_rng,
    with_randaugment,
)
from mmkd.dist import DistInfo
from mmkd.errors import UsageError
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher.cache import (
    BuildSpec,
    CachedTeacher,
    CacheExpectation,
    CacheFingerprintError,
    build_cache,
    cache_size,
)
from mmkd.teacher.targets import teacher_outputs
from mmkd.teacher_spec import cache_value

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RA = RandAugmentConfig(num_ops=2, magnitude=9, num_magnitude_bins=31)
# a student built without the teacher's weights (training from a cache never loads them)
NEW_STUDENT = ["student.vision={source: new, arch: clip_vision, config: {image_size: 32, patch_size: 8, "
               "hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}",
               "student.text={source: new, arch: bert, config: {hidden_size: 32, num_hidden_layers: 1, "
               "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}"]

pytestmark = pytest.mark.usefixtures("one_thread")


def image(seed: int = 0, h: int = 24, w: int = 28, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hi, size=(h, w, 3), dtype=np.uint8)


def op(arr: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    return np.asarray(ra.apply_op(Image.fromarray(arr), name, magnitude)).astype(np.int64)


def sample_nearest(arr: np.ndarray, xin: np.ndarray, yin: np.ndarray) -> np.ndarray:
    """Nearest-neighbour sampling at source coordinates (pixel (x, y) covers [x, x+1)), ``FILL`` outside."""
    h, w = arr.shape[:2]
    xi, yi = np.floor(xin).astype(int), np.floor(yin).astype(int)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.empty_like(arr)
    out[...] = ra.FILL
    out[inside] = arr[yi[inside], xi[inside]]
    return out.astype(np.int64)


def centres(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = arr.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    return x + 0.5, y + 0.5


# -------------------------------------------------------------------------------------------------- each op


def test_op_list_and_magnitudes_are_torchvisions() -> None:
    assert ra.ORDER == ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                        "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
    assert set(ra.ORDER) == set(ra.OPS.names())
    bins, b = 31, 9
    cfg = RandAugmentConfig(2, b, bins)
    lin = {name: np.linspace(0.0, top, bins)[b] for name, top in
           (("ShearX", 0.3), ("Rotate", 30.0), ("Brightness", 0.9), ("Sharpness", 0.9))}
    for name, want in lin.items():
        assert ra.magnitude_of(name, cfg, 32, 48) == pytest.approx(want)
    assert ra.magnitude_of("TranslateX", cfg, 32, 48) == pytest.approx(np.linspace(0, 150 / 331 * 32, bins)[b])
    assert ra.magnitude_of("TranslateY", cfg, 32, 48) == pytest.approx(np.linspace(0, 150 / 331 * 48, bins)[b])
    posterize = 8 - np.round(np.arange(bins) / ((bins - 1) / 4)).astype(int)
    solarize = np.linspace(255.0, 0.0, bins)
    for level in (0, 9, 15, 30):
        c = RandAugmentConfig(2, level, bins)
        assert ra.magnitude_of("Posterize", c, 32, 32) == posterize[level]
        assert ra.magnitude_of("Solarize", c, 32, 32) == pytest.approx(solarize[level])
    assert ra.magnitude_of("Equalize", cfg, 32, 32) == ra.magnitude_of("Identity", cfg, 32, 32) == 0.0


def test_geometric_ops_match_nearest_sampling_with_grey_fill() -> None:
    arr = image(1)
    x, y = centres(arr)
    assert (op(arr, "Identity", 0.0) == arr).all()
    # translate: an exact integer shift, grey where nothing lands
    want = np.empty_like(arr)
    want[...] = ra.FILL
    want[:, 5:] = arr[:, :-5]
    assert (op(arr, "TranslateX", 5.7) == want).all()  # int(): 5 pixels, as torchvision
    want = np.empty_like(arr)
    want[...] = ra.FILL
    want[:-3] = arr[3:]
    assert (op(arr, "TranslateY", -3.2) == want).all()
    # shear and rotate: PIL's fixed-point sampling may round an exact boundary the other way: ≥ 98% identical
    cases = {("ShearX", 0.27): sample_nearest(arr, x + 0.27 * y, y),
             ("ShearY", -0.18): sample_nearest(arr, x, y - 0.18 * x)}
    t = -math.radians(21.0)
    cx, cy = arr.shape[1] / 2, arr.shape[0] / 2
    cases[("Rotate", 21.0)] = sample_nearest(arr, math.cos(t) * (x - cx) + math.sin(t) * (y - cy) + cx,
                                             -math.sin(t) * (x - cx) + math.cos(t) * (y - cy) + cy)
    for (name, m), want in cases.items():
        got = op(arr, name, m)
        same = (got == want).all(axis=2).mean()
        assert same >= 0.98, (name, same)
        assert (got == 128).all(axis=2).sum() > 0, name  # something was filled with grey


def test_colour_ops_match_numpy() -> None:
    arr = image(2)
    a = arr.astype(np.float64)
    gray = np.round(a @ np.array([0.299, 0.587, 0.114]))[..., None]
    mean = int(np.mean(np.asarray(Image.fromarray(arr).convert("L"), dtype=np.float64)) + 0.5)
    for m in (0.54, -0.81):
        f = 1.0 + m
        assert np.abs(op(arr, "Brightness", m) - np.clip(a * f, 0, 255)).max() <= 1
        assert np.abs(op(arr, "Color", m) - np.clip(gray + f * (a - gray), 0, 255)).max() <= 2
        assert np.abs(op(arr, "Contrast", m) - np.clip(mean + f * (a - mean), 0, 255)).max() <= 2
        # Sharpness: blend with PIL's SMOOTH filter (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, /13); borders untouched
        k = np.ones((3, 3)) / 13
        k[1, 1] = 5 / 13
        smooth = a.copy()
        h, w = a.shape[:2]
        smooth[1:-1, 1:-1] = sum(k[i, j] * a[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
        want = np.clip(np.round(smooth) + f * (a - np.round(smooth)), 0, 255)
        got = op(arr, "Sharpness", m)
        assert np.abs(got[1:-1, 1:-1] - want[1:-1, 1:-1]).max() <= 2
        assert (got[0] == arr[0]).all() and (got[:, -1] == arr[:, -1]).all()


def test_histogram_ops_match_numpy() -> None:
    arr = image(3, hi=200)  # values 0..199: AutoContrast has something to stretch
    assert (op(arr, "Posterize", 5) == (arr & 0b11111000)).all()
    assert (op(arr, "Solarize", 100.0) == np.where(arr >= 100, 255 - arr, arr)).all()
    lo, hi = arr.min(axis=(0, 1)), arr.max(axis=(0, 1))
    want = np.floor((arr - lo) * (255.0 / (hi - lo)))
    assert np.abs(op(arr, "AutoContrast", 0.0) - want).max() <= 1
    eq = np.empty_like(arr)
    for c in range(3):  # PIL's equalize, per channel: cumulative histogram in steps of (count - last bin) // 255
        hist = np.bincount(arr[..., c].ravel(), minlength=256)
        step = (hist.sum() - hist[np.nonzero(hist)[0][-1]]) // 255
        lut = (step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step
        eq[..., c] = np.clip(lut, 0, 255)[arr[..., c]]
    assert (op(arr, "Equalize", 0.0) == eq).all()


def test_magnitude_zero_is_identity() -> None:
    arr = image(4, hi=255)  # no pure white: Solarize's threshold at bin 0 is 255 (torchvision's), inverting only it
    zero = RandAugmentConfig(num_ops=1, magnitude=0)
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                 "Sharpness", "Posterize", "Solarize"):
        for sign in (1, -1):
            m = sign * ra.magnitude_of(name, zero, 28, 24) if ra.OPS.get(name).signed else ra.magnitude_of(
                name, zero, 28, 24)
            assert (op(arr, name, m) == arr).all(), name


# -------------------------------------------------------------------------------------------------- views


def transforms_with(cfg: RandAugmentConfig | None, size: int = 16) -> tuple[ImageTransform, ImageTransform]:
    return (ImageTransform(TransformConfig(size, MEAN, STD, train=True, randaugment=cfg)),
            ImageTransform(TransformConfig(size, MEAN, STD)))


def test_randaugment_runs_after_the_same_crop_and_view_zero_is_untouched() -> None:
    arr = image(5, 40, 48)
    train, plain_eval = transforms_with(RA)
    train_plain, _ = transforms_with(None)
    for view in range(1, 6):
        rng = view_rng(3, "k", view)
        box = random_resized_crop_box(48, 40, (0.6, 1.0), (3 / 4, 4 / 3), rng)  # the crop draws come first
        want = np.asarray(ra.randaugment(crop_resize(Image.fromarray(arr), box, 16), RA, rng))
        got = apply_view_pixels(train, plain_eval, arr, 3, "k", view)
        assert (got == want).all()
        # without RandAugment the same view is the same crop as before (the pixels of version 2, unchanged)
        assert (apply_view_pixels(train_plain, plain_eval, arr, 3, "k", view)
                == np.asarray(crop_resize(Image.fromarray(arr), box, 16))).all()
    assert TRANSFORM_VERSION == 2
    assert (apply_view_pixels(train, plain_eval, arr, 3, "k", 0) == plain_eval.view(arr)).all()
    views = [apply_view_pixels(train, plain_eval, arr, 3, "k", v).tobytes() for v in range(1, 9)]
    assert len(set(views)) == len(views)  # different views, different pixels
    assert apply_view_pixels(train, plain_eval, arr, 3, "k", 2).tobytes() == views[1]  # same view, same pixels


def test_ops_and_signs_are_all_drawn() -> None:
    seen = [step for v in range(1, 400) for step in ra.draw_ops(RA, view_rng(0, "k", v), 32, 32)]
    assert {name for name, _ in seen} == set(ra.ORDER)
    assert {math.copysign(1, m) for name, m in seen if name == "Rotate"} == {1.0, -1.0}


VIEW_SCRIPT = """
import hashlib, numpy as np
from mmkd.config import RandAugmentConfig
from mmkd.data.transforms import ImageTransform, TransformConfig, apply_view_pixels
arr = np.random.default_rng(5).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
t = ImageTransform(TransformConfig(16, (0.5,) * 3, (0.25,) * 3, train=True, randaugment=RandAugmentConfig(3, 12)))
e = ImageTransform(TransformConfig(16, (0.5,) * 3, (0.25,) * 3))
print(hashlib.sha256(b"".join(apply_view_pixels(t, e, arr, 11, f"key{v}", v).tobytes() for v in range(8)))
      .hexdigest())
"""


def test_views_are_the_same_in_another_process() -> None:
    arr = image(5, 40, 48)
    train, plain_eval = transforms_with(RandAugmentConfig(3, 12))
    here = hashlib.sha256(b"".join(apply_view_pixels(train, plain_eval, arr, 11, f"key{v}", v).tobytes()
                                   for v in range(8))).hexdigest()
    out = subprocess.run([sys.executable, "-c", VIEW_SCRIPT], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == here


# -------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, message", [
    ({"num_ops": 0}, "data.randaugment: num_ops must be an integer ≥ 1"),
    ({"magnitude": 31}, r"data.randaugment: magnitude must be an integer in \[0, num_magnitude_bins - 1\]"),
    ({"magnitude": -1}, "data.randaugment: magnitude"),
    ({"num_magnitude_bins": 1, "magnitude": 0}, "data.randaugment: num_magnitude_bins must be an integer ≥ 2"),
    ({"magnitude": 2.5}, "data.randaugment.magnitude: expected an integer"),
    ({"ops": 2}, "unknown config key 'data.randaugment.ops'"),
])
def test_config_errors_name_the_key(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"augment": True, "randaugment": bad}})


def test_config_defaults_and_needs_augment() -> None:
    cfg = config_from_dict({"data": {"augment": True, "randaugment": {}}})
    assert cfg.data.randaugment == RandAugmentConfig(2, 9, 31)
    assert config_from_dict({}).data.randaugment is None
    with pytest.raises(ConfigError, match="data.randaugment applies to augmented views only"):
        config_from_dict({"data": {"randaugment": {}}})
    with pytest.raises(ValueError, match=r"randaugment: unknown setting\(s\) \['bins'\]"):
        TransformConfig(16, MEAN, STD, train=True, randaugment={"bins": 3})
    assert TransformConfig(16, MEAN, STD, randaugment={"num_ops": 1}).randaugment == RandAugmentConfig(1)


def test_cli_flag_is_parsed_and_checked() -> None:
    from mmkd.cache_command import parse_randaugment

    assert parse_randaugment("2,9") == RandAugmentConfig(2, 9, 31)
    assert parse_randaugment("1,3,10") == RandAugmentConfig(1, 3, 10)
    for bad, msg in (("2", "give 2 or 3 numbers"), ("2,x", "invalid literal"), ("2,40", "magnitude must be"),
                     ("0,1", "num_ops must be")):
        with pytest.raises(UsageError, match=f"--randaugment '{bad}'.*{msg}"):
            parse_randaugment(bad)


def test_cache_cli_refuses_a_malformed_flag(tiny_teacher_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", "world:train", "--world-n", "4",
                 "--data-cache", str(tmp_path / "world"), "--out", str(tmp_path / "tc"), "--randaugment", "2,31"]) == 2
    err = capsys.readouterr().err
    assert "--randaugment '2,31': magnitude must be an integer in [0, num_magnitude_bins - 1] = [0, 30]" in err
    assert not (tmp_path / "tc").exists()


# -------------------------------------------------------------------------------- teacher pixels, online and cached


@pytest.fixture(scope="module")
def ra_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Any]:
    """A world:train run config with RandAugment, its twin without, and a cache of each built by `mmkd cache
    --config` (2 views, so view 1 is augmented)."""
    root = tmp_path_factory.mktemp("ra")
    out: dict[str, Any] = {}
    for name, extra in (("ra", ", randaugment: {num_ops: 2, magnitude: 15}"), ("plain", "")):
        d = root / name
        d.mkdir()
        cache = d / "tc"
        cfg = write_run_config(d, f"cache:{cache}", world_size=16, data_extra=f", augment: true{extra}",
                               objectives="[{name: fd_mse_cosine}]")
        assert main(["cache", "--config", str(cfg), "--teacher", str(tiny_teacher_dir), "--views", "2",
                     "--chunk-rows", "8", "--threads", "1"]) == 0
        (d / "online").mkdir()
        online = write_run_config(d / "online", str(tiny_teacher_dir), world_size=16,
                                  data_extra=f", augment: true{extra}", objectives="[{name: fd_mse_cosine}]")
        out[name] = {"config": cfg, "cache": cache, "online": online}
    return out


def test_online_teacher_sees_the_students_pixels(ra_run: dict[str, Any]) -> None:
    from mmkd.run_setup import prepare

    one_layer = ["student.vision.keep_layers=[0]"]  # the tiny teacher has one layer
    cfg = load_config(ra_run["ra"]["online"], one_layer)
    data = prepare(cfg, DistInfo(), lambda *a: None).data
    plain = prepare(load_config(ra_run["plain"]["online"], one_layer), DistInfo(), lambda *a: None).data
    assert data.teacher_banks is not None and data.paired.train_tf.cfg.randaugment == cfg.data.randaugment
    assert data.teacher_banks[0].train_tf.cfg == data.paired.train_tf.cfg  # same size here: the same transform
    for step in range(2):
        batch = data.batch(step)
        assert any(batch.views)
        assert torch.equal(batch.teacher_pixels, batch.pixel_values)
        other = plain.batch(step)
        assert other.views == batch.views and other.keys == batch.keys
        aug = [i for i, v in enumerate(batch.views) if v]
        assert not torch.equal(other.pixel_values[aug], batch.pixel_values[aug])  # RandAugment did something


def test_cache_replays_randaugmented_views_and_refuses_other_settings(ra_run: dict[str, Any],
                                                                      tiny_teacher_dir: Path) -> None:
    from mmkd.models.hub import load_dual_encoder
    from mmkd.run_setup import prepare

    with_ra, without = ra_run["ra"], ra_run["plain"]
    cache = CachedTeacher.open(with_ra["cache"])
    assert cache.augmentation["randaugment"] == {"num_ops": 2, "magnitude": 15, "num_magnitude_bins": 31}
    assert "randaugment" not in CachedTeacher.open(without["cache"]).augmentation
    data = prepare(load_config(with_ra["config"], NEW_STUDENT), DistInfo(), lambda *a: None).data
    teacher = load_dual_encoder(tiny_teacher_dir).eval()
    batch = data.batch(0)
    assert any(batch.views)
    fresh = teacher_outputs(teacher, batch.pixel_values, batch.captions)
    torch.testing.assert_close(cache(batch)["image_embeds"], fresh["image_embeds"], atol=2e-3, rtol=1e-2)
    # a run without RandAugment refuses the cache built with it, and the other way round
    for cfg, folder, where in ((without["config"], with_ra["cache"], "only in cache"),
                              (with_ra["config"], without["cache"], "only in training")):
        with pytest.raises(CacheFingerprintError, match=f"transform.augmentation.randaugment: {where}"):
            prepare(dataclasses.replace(load_config(cfg, NEW_STUDENT), teacher=cache_value(folder)), DistInfo(),
                    lambda *a: None)
    # settings that differ are named too
    other = dataclasses.replace(load_config(with_ra["config"], NEW_STUDENT).data.randaugment, magnitude=3)
    expect = CacheExpectation(augmentation=with_randaugment(cache.augmentation, other))
    with pytest.raises(CacheFingerprintError, match="transform.augmentation.randaugment.magnitude"):
        cache.check(expect)


def test_cache_cli_refuses_randaugment_twice(ra_run: dict[str, Any], tiny_teacher_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "--config", str(ra_run["ra"]["config"]), "--teacher", str(tiny_teacher_dir),
                 "--randaugment", "2,9"]) == 2
    assert "either with --randaugment or through --config" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- bytes


def records(n: int, captions: int = 2) -> list[Record]:
    imgs = np.random.default_rng(0).integers(0, 256, size=(n, 40, 48, 3), dtype=np.uint8)
    return [Record(f"s{i:03d}", imgs[i], tuple(f"thing {i} number {c}" for c in range(captions))) for i in range(n)]


@pytest.mark.parametrize("dtype, views, features", [("float16", 12, False), ("bfloat16", 12, True),
                                                    ("float32", 1, False)])
def test_bytes_per_sample_are_exact(teacher: DualEncoder, tmp_path: Path, dtype: str, views: int,
                                    features: bool) -> None:
    n, caps = 10, 2
    recs = records(n, caps)
    out = tmp_path / "c"
    build_cache(teacher, recs, out, BuildSpec(views=views, dtype=dtype, features=features, chunk_rows=4, batch_size=8,
                                              precision="fp32", augmentation=with_randaugment(None, RA)))
    size = cache_size(out)
    item = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    d = teacher.projection_dim
    f = teacher.vision_model.config.hidden_size
    want = {"image_embeds": n * views * d * item, "text_embeds": n * caps * d * item}
    if features:
        want.update(image_features=n * views * f * item, text_features=n * caps * f * item)
    assert size.arrays == want
    assert (size.n_samples, size.n_captions, size.views, size.dtype) == (n, n * caps, views, dtype)
    assert size.embedding_bytes_per_sample == sum(want.values()) / n
    assert size.folder == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size.folder_bytes_per_sample == size.folder / n > size.embedding_bytes_per_sample
    assert f"{size.embedding_bytes_per_sample:,.1f} in embedding arrays" in size.line()
    if views == 12:  # the last view replays: its stored embedding is the teacher's on the replayed pixels
        cache = CachedTeacher.open(out)
        m = teacher.meta
        bank = cache.bank(recs, m.image_size, m.image_mean, m.image_std)
        assert bank.train_tf.cfg.randaugment == RA
        pix = bank.pixels([3, 7], [11, 10])
        fresh = teacher_outputs(teacher.eval(), pix, ["x", "y"])["image_embeds"]
        stored = torch.cat([cache.images(["s003"], [11])["image_embeds"], cache.images(["s007"], [10])["image_embeds"]])
        torch.testing.assert_close(stored, fresh, atol=3e-2 if dtype == "bfloat16" else 3e-3, rtol=0)


def test_cache_command_and_verify_print_bytes_per_sample(ra_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    folder = ra_run["ra"]["cache"]
    assert main(["cache", "--verify", str(folder), "--quick"]) == 0
    out = capsys.readouterr().out
    size = cache_size(folder)
    assert f"bytes per sample: {size.embedding_bytes_per_sample:,.1f} in embedding arrays" in out
    assert f"{size.folder_bytes_per_sample:,.1f} for the whole folder" in out
    assert size.n_samples == 16 and size.views == 2
    assert set(size.to_json()) >= {"embedding_bytes_per_sample", "folder_bytes_per_sample", "arrays"}


def test_cache_flag_builds_with_randaugment_and_prints_bytes_per_sample(
        tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tc"
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", "world:train", "--world-n", "8",
                 "--data-cache", str(tmp_path / "world"), "--out", str(out), "--views", "3", "--randaugment", "1,5,11",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    size = cache_size(out)
    assert f"bytes per sample: {size.embedding_bytes_per_sample:,.1f} in embedding arrays" in printed
    assert size.arrays["image_embeds"] == 8 * 3 * teacher_dim(tiny_teacher_dir) * 2  # float16 by default
    assert CachedTeacher.open(out).augmentation["randaugment"] == {"num_ops": 1, "magnitude": 5,
                                                                   "num_magnitude_bins": 11}


def teacher_dim(folder: Path) -> int:
    from mmkd.models.hub import load_dual_encoder

    return load_dual_encoder(folder).projection_dim


def test_augmentation_settings_leave_randaugment_out_when_off() -> None:
    assert "randaugment" not in augmentation_settings(TransformConfig(16, MEAN, STD, train=True))
    on = augmentation_settings(TransformConfig(16, MEAN, STD, train=True, randaugment=RA))
    assert on["randaugment"] == {"num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31}
    bank = ImageBank(records(2), 16, MEAN, STD, True, 0, on)
    assert bank.train_tf.cfg.randaugment == RA
    assert with_randaugment(on, None) == augmentation_settings(TransformConfig(16, MEAN, STD, train=True))
