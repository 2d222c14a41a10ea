"""JPEG decoding at the size a view needs: views within tolerance of PIL's full decode, the PIL fallback, errors
for broken files, the pixel limit checked before decoding, and never decoding a crop below its output size."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.data import decode
from mmkd.data.batches import ImageBank
from mmkd.data.decode import TOLERANCE_MEAN_ABS, TOLERANCE_PSNR_DB, decode_rgb, jpeg_decoder, view_difference
from mmkd.data.records import DataError, EncodedImage, Record, open_encoded, open_image
from mmkd.data.transforms import ImageTransform, TransformConfig, view_rng

DECODERS = ["simplejpeg", "pil"]
SEED = 3


def photo(w: int = 200, h: int = 150, seed: int = 0) -> Image.Image:
    """Gradients, hard edges and fine texture: what DCT scaling and resampling filter differently."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([x / w * 255, y / h * 255, (x + y) % 64 * 4], axis=2)
    arr[h // 4: h // 2, w // 3: w // 2] = (250, 30, 30)
    arr += rng.normal(0, 6, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


SYNTHETIC = {
    "jpeg": lambda: encoded(photo(), quality=90),
    "jpeg-444": lambda: encoded(photo(seed=1), quality=95, subsampling=0),
    "progressive": lambda: encoded(photo(seed=2), quality=85, progressive=True),
    "grayscale": lambda: encoded(photo(seed=3).convert("L"), quality=90),
    "cmyk": lambda: encoded(photo(seed=4).convert("CMYK"), quality=90),
    "png": lambda: encoded(photo(seed=5), "PNG"),
    "palette-png": lambda: encoded(photo(seed=6).convert("P"), "PNG"),
}


def transforms(size: int) -> tuple[ImageTransform, ImageTransform]:
    """Eval and train transforms with mean 0, std 1, so views convert back to exact uint8 pixels."""
    cfg = dict(image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return ImageTransform(TransformConfig(**cfg)), ImageTransform(TransformConfig(**cfg, train=True))


def as_uint8(t: torch.Tensor) -> np.ndarray:
    return (t * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def views(image: object, size: int, key: str) -> list[np.ndarray]:
    """The eval view and two replayable train views of ``image`` (PIL image or still encoded)."""
    ev, tr = transforms(size)
    return [as_uint8(ev(image))] + [as_uint8(tr(image, rng=view_rng(SEED, key, v))) for v in (1, 2)]


def plain(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def assert_within_tolerance(fast: list[np.ndarray], ref: list[np.ndarray], what: str) -> None:
    diffs = [view_difference(a, b) for a, b in zip(fast, ref)]
    worst = min(p for _, p in diffs)
    mean_abs = float(np.mean([m for m, _ in diffs]))
    assert worst >= TOLERANCE_PSNR_DB, f"{what}: a view is {worst:.1f} dB from PIL's"
    assert mean_abs <= TOLERANCE_MEAN_ABS, f"{what}: views differ from PIL's by {mean_abs:.2f} levels on average"


def record(data: bytes, key: str = "k", decoder: str | None = None) -> EncodedImage:
    enc = open_encoded(Record(key, data, origin=f"shard.tar:{key}"), decoder)
    assert isinstance(enc, EncodedImage)
    return enc


# ------------------------------------------------------------------------------------------- output quality


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("kind", list(SYNTHETIC))
def test_views_of_every_image_kind_match_pil_within_tolerance(kind: str, decoder: str) -> None:
    data = SYNTHETIC[kind]()
    for size in (64, 32):
        fast, ref = views(record(data, kind, decoder), size, kind), views(plain(data), size, kind)
        assert_within_tolerance(fast, ref, f"{kind} at {size} px by {decoder}")
        if kind in ("cmyk", "png", "palette-png"):  # not a YCbCr/grayscale JPEG: PIL decodes it whole, as before
            assert all(np.array_equal(a, b) for a, b in zip(fast, ref))


def test_views_of_coco_photos_match_pil_within_tolerance(shared_data: Path) -> None:
    photos = sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))[:6]
    assert len(photos) == 6
    fast, ref = [], []
    for p in photos:
        data = p.read_bytes()
        for size in (224, 32):
            fast += views(record(data, p.name), size, p.name)
            ref += views(plain(data), size, p.name)
        # where both offer the same factor (1/8 for a 32-px view of a ~640-px photo) both give the same pixels
        by = {d: views(record(data, p.name, d), 32, p.name) for d in DECODERS}
        assert all(np.array_equal(a, b) for a, b in zip(*by.values())), p.name
    assert_within_tolerance(fast, ref, "coco-mini")
    assert any(not np.array_equal(a, b) for a, b in zip(fast, ref))  # DCT scaling did happen


def test_image_bank_decodes_paths_and_bytes_to_the_same_replayable_views(tmp_path: Path) -> None:
    data = SYNTHETIC["jpeg"]()
    (tmp_path / "a.jpg").write_bytes(data)
    recs = [Record("a", tmp_path / "a.jpg", ("x",)), Record("a", data, ("x",))]
    bank = ImageBank(recs, 48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True, seed=SEED)
    a = bank.pixels([0, 1, 0, 1], [0, 0, 2, 2])
    assert torch.equal(a[0], a[1]) and torch.equal(a[2], a[3]) and not torch.equal(a[0], a[2])
    assert torch.equal(a, bank.pixels([0, 1, 0, 1], [0, 0, 2, 2]))  # a pure function of (seed, key, view)
    assert open_image(recs[0]).size == (200, 150)  # open_image still gives the whole image


# --------------------------------------------------------------------------------------------------- fallback


def test_without_simplejpeg_pil_decodes_with_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    data = SYNTHETIC["jpeg"]()
    fast = views(record(data, "k"), 64, "k")
    assert jpeg_decoder().name == "simplejpeg"
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # as if it were not installed
    assert jpeg_decoder().name == "pil"
    with pytest.raises(ImportError, match="pip install simplejpeg"):
        jpeg_decoder("simplejpeg")
    fallback = views(record(data, "k"), 64, "k")
    img, box = decode_rgb(data, (0, 0, 200, 150), 64)
    assert img.size == (100, 75) and box == (0, 0, 100, 75)  # PIL's draft scaled it by 1/2
    assert_within_tolerance(fallback, views(plain(data), 64, "k"), "PIL fallback")
    assert_within_tolerance(fallback, fast, "PIL fallback against simplejpeg")


# ------------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("decoder", DECODERS)
def test_broken_images_are_data_errors_naming_the_sample(decoder: str, tmp_path: Path) -> None:
    data = SYNTHETIC["jpeg"]()
    bank = ImageBank([Record("cut", data[: len(data) // 2], ("x",), origin="shard.tar:cut"),
                      Record("junk", b"this is not a picture", ("x",), origin="shard.tar:junk"),
                      Record("gone", tmp_path / "gone.jpg", ("x",), origin="data.jsonl:3")],
                     32, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(DataError, match=r"^shard.tar:cut: cannot read image \(bytes\): .*truncated.*remove the"):
        bank.pixels([0])
    with pytest.raises(DataError, match=r"^shard.tar:junk: cannot read image \(bytes\): cannot identify"):
        bank.pixels([1])
    with pytest.raises(DataError, match=r"^data.jsonl:3: image file .*gone.jpg not found"):
        bank.pixels([2])
    with pytest.raises(DataError, match="cannot read image"):
        record(data[: len(data) // 2], decoder=decoder).decode((0, 0, 200, 150), 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = SYNTHETIC["jpeg"]()
    monkeypatch.setattr(decode, "decode_rgb", lambda *a, **k: pytest.fail("decoded before the size check"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 150 - 1)
    with pytest.raises(DataError, match=r"image \(bytes\) is 200×150 = 30000 pixels, over the limit of 29999"):
        open_encoded(Record("big", data))


# ---------------------------------------------------------------------------------------------- scale choice


@pytest.mark.parametrize("decoder", DECODERS)
def test_scaling_never_shrinks_the_crop_below_the_output_size(decoder: str) -> None:
    rng = np.random.default_rng(0)
    dec = jpeg_decoder(decoder)
    for i in range(24):
        w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
        data = encoded(photo(w, h, seed=i), quality=80)
        bw, bh = rng.uniform(0.2, 1.0) * w, rng.uniform(0.2, 1.0) * h
        left, top = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = (left, top, left + bw, top + bh)
        out = int(rng.integers(8, 128))
        img, scaled = decode_rgb(data, box, out, dec)
        f = decode.scale_factor(box, out, dec.factors)
        assert f in dec.factors and img.size == (math.ceil(w * f), math.ceil(h * f)), (w, h, box, out, f)
        assert scaled == pytest.approx(tuple(c * f for c in box), abs=1e-9)
        if f < 1:  # scaled: the crop still spans at least the output size each way
            assert min(scaled[2] - scaled[0], scaled[3] - scaled[1]) >= out - 1e-9, (w, h, box, out, f)
        smaller = [g for g in dec.factors if g < f]
        if smaller:  # the next smaller factor would have shrunk the crop below the output size
            assert min(bw, bh) * smaller[-1] < out
        assert scaled[2] <= img.size[0] + 1e-9 and scaled[3] <= img.size[1] + 1e-9


# ------------------------------------------------------------------------------------------- teacher caches


def test_cache_built_by_the_previous_transform_version_is_refused(minilm_path: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import tiny_dual_encoder

    from mmkd.data import transforms
    from mmkd.teacher.cache import BuildSpec, CachedTeacher, CacheExpectation, CacheFingerprintError, build_cache
    from mmkd.teacher.cache import meta as cache_meta

    assert transforms.TRANSFORM_VERSION == 2  # 2: JPEGs decoded with DCT scaling (mmkd.data.decode)
    recs = [Record(f"s{i}", SYNTHETIC["jpeg"](), (f"a photo {i}",)) for i in range(4)]
    monkeypatch.setattr(cache_meta, "TRANSFORM_VERSION", 1)  # as the mmkd before DCT-scaled decoding wrote it
    build_cache(tiny_dual_encoder(minilm_path), recs, tmp_path / "c",
                BuildSpec(views=2, dtype="float32", chunk_rows=4, batch_size=4, precision="fp32"))
    with pytest.raises(CacheFingerprintError, match="transform.version: the cache's views come from transform "
                                                    "version 1, this mmkd makes version 2"):
        CachedTeacher.open(tmp_path / "c").check(CacheExpectation())
