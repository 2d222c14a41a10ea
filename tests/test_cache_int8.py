"""The int8 teacher cache (``mmkd cache --dtype int8``): symmetric per-vector quantisation, each row's float32 scale
stored beside its values. Targets are within the quantisation bound of float32's and float16's, bytes per sample are
exactly (D + 4) / 2D of float16's, and verify, export, import and training read it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache import _build, _jsonl, _run_config, make_records

from mmkd.cli import main
from mmkd.data.records import Record
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher.cache import CachedTeacher, cache_size, verify_cache
from mmkd.teacher.cache.format import from_storage, quantise_int8, read_meta, to_storage

pytestmark = pytest.mark.usefixtures("one_thread")
ARRAYS = ("image_embeds", "image_features", "text_embeds", "text_features")


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return make_records(12)


@pytest.fixture(scope="module")
def caches(teacher: DualEncoder, records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8")
    for dtype in ("float32", "float16", "int8"):
        _build(teacher, records, root / dtype, dtype=dtype, views=2, features=True)
    return {d: root / d for d in ("float32", "float16", "int8")}


def targets(folder: Path, records: list[Record]) -> dict[str, torch.Tensor]:
    cache = CachedTeacher.open(folder)
    keys = [r.key for r in records]
    out = {f"{a}@{v}": t for v in (0, 1) for a, t in cache.images(keys, [v] * len(keys)).items()}
    out.update(cache.texts(sorted({c for r in records for c in r.captions})))
    return out


def test_quantisation_bound_per_vector() -> None:
    """|x − q·s| ≤ s/2 elementwise with s = max|x|/127 (the definition, in float64), through the stored bytes."""
    x = torch.randn(64, 3, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 40)
    x[5, 1] = 0.0  # a zero vector: scale 1, values 0
    stored = to_storage(x, "int8")
    assert stored.dtype == np.int8 and stored.shape == (64, 3, 44)
    back = from_storage(stored, "int8").double()
    s = x.double().abs().amax(-1, keepdim=True) / 127
    err = (x.double() - back).abs()
    assert bool((err <= s / 2 * (1 + 1e-6) + 1e-30).all())
    assert torch.equal(back[5, 1], torch.zeros(40, dtype=torch.float64))
    q, scale = quantise_int8(x)
    assert int(q.abs().max()) == 127 and torch.equal(scale[5, 1], torch.ones(1))


def test_int8_targets_are_within_the_bound_of_float32_and_float16(caches: dict[str, Path],
                                                                  records: list[Record]) -> None:
    ref, half, got = (targets(caches[d], records) for d in ("float32", "float16", "int8"))
    assert set(got) == set(ref) and {k.split("@")[0] for k in got} == set(ARRAYS)
    for k, x in ref.items():
        x64, q64, h64 = x.double(), got[k].double(), half[k].double()
        bound = x64.abs().amax(-1, keepdim=True) / 127 / 2
        assert got[k].dtype == torch.float32 and got[k].shape == x.shape
        assert bool(((x64 - q64).abs() <= bound * (1 + 1e-5)).all()), k
        # against float16's targets: the same bound plus float16's own rounding of x (2^-11 relative)
        assert bool(((h64 - q64).abs() <= bound * (1 + 1e-5) + x64.abs() * 2.0 ** -11).all()), k
        assert not torch.equal(q64, x64)  # really quantised


def test_int8_bytes_per_sample_are_d_plus_4_over_2d_of_float16(caches: dict[str, Path]) -> None:
    half, int8 = cache_size(caches["float16"]), cache_size(caches["int8"])
    assert int8.dtype == "int8" and half.dtype == "float16"
    dims = read_meta(caches["int8"])["layout"]["arrays"]
    for name, shape in dims.items():
        d = shape[-1]
        # exact arithmetic from the .npy headers: every row of D float16 values (2D bytes) became D + 4 bytes
        assert int8.arrays[name] * 2 * d == half.arrays[name] * (d + 4), name
    assert int8.embedding_bytes_per_sample / half.embedding_bytes_per_sample < 0.6


def test_meta_records_int8_and_verify_checks_it(caches: dict[str, Path]) -> None:
    meta = read_meta(caches["int8"])
    assert meta["fingerprint"]["storage"]["dtype"] == "int8" and meta["layout"]["numpy_dtype"] == "|i1"
    assert "float32 scale" in meta["layout"]["row_format"]
    report = verify_cache(caches["int8"])
    assert report.ok, report.problems
    # a flipped byte in a row's scale is caught by the deep check (the checksum) and by the shard's size rule
    shard = sorted((caches["int8"] / "segments").glob("*/image-00000.image_embeds.npy"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-2] ^= 0x7F
    shard.write_bytes(bytes(raw))
    try:
        bad = verify_cache(caches["int8"])
        assert not bad.ok and any(str(shard) in p and "checksum" in p for p in bad.problems)
    finally:
        raw[-2] ^= 0x7F
        shard.write_bytes(bytes(raw))


def test_export_and_import_handle_int8(caches: dict[str, Path], records: list[Record], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Export writes the dequantised floats (clip-retrieval's readers expect floats); import can store int8."""
    pytest.importorskip("pyarrow")
    data = _jsonl(tmp_path, [dataclasses.replace(r, captions=r.captions[:1]) for r in records])  # one per image
    out = tmp_path / "exported"
    assert main(["cache", "export", str(caches["int8"]), "--out", str(out), "--data", f"jsonl:{data}"]) == 0
    img = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    assert img.dtype == np.float32
    want = CachedTeacher.open(caches["int8"]).images([r.key for r in records])["image_embeds"]
    np.testing.assert_array_equal(img, want.numpy())
    again = tmp_path / "imported"
    assert main(["cache", "import", "--from", str(out), "--data", f"jsonl:{data}", "--out", str(again),
                 "--dtype", "int8"]) == 0
    assert read_meta(again)["fingerprint"]["storage"]["dtype"] == "int8" and verify_cache(again).ok
    back = CachedTeacher.open(again).images([r.key for r in records])["image_embeds"]
    torch.testing.assert_close(back, want, atol=float(want.abs().max()) / 127, rtol=0)  # quantised twice


def test_distill_from_an_int8_cache(tiny_teacher_dir: Path, records: list[Record], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`mmkd cache --dtype int8` from the command line, then training reads it (lookups dequantise in the loader)."""
    data = _jsonl(tmp_path, records)
    cache = tmp_path / "tc"
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", f"jsonl:{data}", "--out", str(cache),
                 "--views", "2", "--features", "--chunk-rows", "8", "--threads", "1", "--dtype", "int8"]) == 0
    assert main(["cache", "--verify", str(cache)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["distill", str(_run_config(tmp_path, cache, data))]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for line in lines for k, v in line.items() if k != "step")
    assert {"clip", "fd_mse/mse_image", "fd_cosine/cosine_text"} <= set(lines[-1])
