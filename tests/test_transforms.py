"""Transforms: shapes, exact normalisation, and augmentation views as pure functions of (seed, key, view)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.data.transforms import (
    ImageTransform,
    TransformConfig,
    apply_view,
    random_resized_crop_box,
    to_normalized_tensor,
    view_rng,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


# the two-step reference for the fused resize + centre crop of ImageTransform (the library never runs these)
def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` (bicubic), keeping the aspect ratio."""
    w, h = image.size
    s = size / min(w, h)
    return image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central size x size square (the image must be at least that big)."""
    w, h = image.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    return image.crop((left, top, left + size, top + size))


def _cfg(**kw) -> TransformConfig:
    return TransformConfig(image_size=kw.pop("image_size", 16), mean=MEAN, std=STD, **kw)


def _gradient(w: int = 40, h: int = 30) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr)


def test_output_shape_and_dtype() -> None:
    for train in (False, True):
        t = ImageTransform(_cfg(train=train))
        for image in (_gradient(), _gradient().convert("L"), np.asarray(_gradient(7, 50))):
            out = t(image, rng=np.random.default_rng(0))
            assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and out.is_contiguous()


def test_normalisation_is_exact() -> None:
    colour = np.array([255, 0, 128], np.uint8)
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, MEAN, STD)], dtype=torch.float32)
    arr = np.broadcast_to(colour, (16, 16, 3))  # model-sized array: fast path, no PIL
    out = ImageTransform(_cfg())(arr)
    torch.testing.assert_close(out, want[:, None, None].expand(3, 16, 16), rtol=0, atol=1e-6)
    big = Image.new("RGB", (50, 37), tuple(int(c) for c in colour))  # PIL path: constant stays constant
    torch.testing.assert_close(ImageTransform(_cfg())(big), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(to_normalized_tensor(arr, MEAN, STD), out)


def test_fast_path_equals_pil_path() -> None:
    arr = np.asarray(_gradient(16, 16))
    t = ImageTransform(_cfg())
    assert torch.equal(t(arr), t(Image.fromarray(arr)))
    ro = arr.copy()  # read-only input (e.g. a memory-mapped STL-10 image) must work without warnings
    ro.flags.writeable = False
    assert torch.equal(t(ro), t(arr))


def test_fused_eval_matches_resize_then_centre_crop() -> None:
    img = _gradient(80, 50)
    fused = ImageTransform(_cfg(image_size=24))(img)
    two_step = to_normalized_tensor(center_crop(resize_shorter(img, 24), 24), MEAN, STD)
    assert (fused - two_step).abs().mean() < 0.05  # same geometry; tiny resampling differences only


def test_eval_keeps_the_centre() -> None:
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left third red, centre black: a centre crop sees no red
    out = ImageTransform(_cfg(image_size=10))(arr)
    red = (1 - MEAN[0]) / STD[0]
    assert out[0].max() < red - 0.5


def test_view_zero_is_eval_and_views_are_reproducible() -> None:
    img = _gradient()
    train, ev = ImageTransform(_cfg(train=True)), ImageTransform(_cfg())
    v0 = apply_view(train, ev, img, seed=1, key="k", view=0)
    assert torch.equal(v0, ev(img)) and torch.equal(v0, apply_view(train, ev, img, 99, "other", 0))
    views = [apply_view(train, ev, img, seed=1, key="k", view=v) for v in (1, 2, 3)]
    assert torch.equal(views[0], apply_view(train, ev, img, seed=1, key="k", view=1))
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    assert not torch.equal(views[0], apply_view(train, ev, img, seed=1, key="k2", view=1))
    assert not torch.equal(views[0], apply_view(train, ev, img, seed=2, key="k", view=1))


def test_view_rng_is_stable_across_processes() -> None:
    here = view_rng(3, "img/0001.jpg", 2).integers(0, 2**62, 4).tolist()
    code = ("from mmkd.data.transforms import view_rng;"
            "print(view_rng(3, 'img/0001.jpg', 2).integers(0, 2**62, 4).tolist())")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here)


def test_random_resized_crop_box_bounds() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(50, 30, (0.3, 0.9), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
        assert 0.25 * 1500 <= (right - left) * (bottom - top) <= 0.95 * 1500
        assert 0.7 <= (right - left) / (bottom - top) <= 1.4
    # Impossible ratio for a thin strip: falls back to a centred legal box.
    assert random_resized_crop_box(100, 5, (0.9, 1.0), (1.0, 1.0), rng) == (47, 0, 52, 5)


def test_hflip_is_off_by_default_and_flips_when_on() -> None:
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)  # red left half
    full = dict(train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # crop = whole image
    ev = ImageTransform(_cfg())
    plain = ImageTransform(_cfg(**full))
    assert all(apply_view(plain, ev, arr, 0, "k", v)[0, 8, 0] > 0 for v in range(1, 9))
    flipped = [apply_view(ImageTransform(_cfg(hflip=True, **full)), ev, arr, 0, "k", v)[0, 8, 0] < 0
               for v in range(1, 17)]
    assert any(flipped) and not all(flipped)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="scale"):
        _cfg(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="std"):
        TransformConfig(16, MEAN, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="view"):
        view_rng(0, "k", -1)


def test_normalize_of_uint8_views_is_the_same_bits_as_the_per_image_path() -> None:
    """Workers ship uint8 views and the training process normalises them (`ImageTransform.normalize`): the floats
    must equal `__call__`'s exactly, for every level in every channel, so moving the arithmetic changes nothing."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    tf = ImageTransform(TransformConfig(16, mean, std))
    levels = np.tile(np.arange(256, dtype=np.uint8), (3, 1)).T.reshape(16, 16, 3)
    chw = torch.from_numpy(np.ascontiguousarray(levels.transpose(2, 0, 1)))
    assert torch.equal(tf.normalize(chw), tf(levels))
    assert torch.equal(tf.normalize(chw[None].expand(2, -1, -1, -1))[1], tf(levels))
    assert tf.view(levels).dtype == np.uint8
