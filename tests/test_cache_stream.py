"""The teacher cache over streaming shards: built shard by shard (one shard's records in memory at a time, the same
bytes as a build from a list), checked against the shard index without reading samples, looked up in the
DataLoader workers, and fingerprinted by the JPEG decoder that made its views."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_cache_scale import _tar

from mmkd.data.records import BadSamples
from mmkd.data.sharded import ShardedRecords, open_shards
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher.cache import BuildSpec, CacheError, build_cache

SHARDS, PER_SHARD = 3, 5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread



def _shards(folder: Path) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(SHARDS):
        _tar(folder / f"part-{part}.tar", {f"p{part}s{i}": (rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                                                            f"thing {part} {i % 3}") for i in range(PER_SHARD)})
    return f"{folder}/part-{{0..{SHARDS - 1}}}.tar"


def _build(teacher: DualEncoder, records: Any, out: Path) -> Any:
    return build_cache(teacher, records, out,
                       BuildSpec(views=2, dtype="float32", chunk_rows=4, batch_size=8, precision="fp32"))


def _files(folder: Path) -> dict[str, bytes]:
    # the saved tokenizer carries the truncation state the previous build's encoding left: not cache content
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock" and p.parent.name != "tokenizer"}


def test_build_over_shards_holds_one_shard_at_a_time_and_matches_the_list_build(
        teacher: DualEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _shards(tmp_path / "data")
    sharded = open_shards(spec, tmp_path / "dc", BadSamples())
    listed = list(sharded)
    listed_result = _build(teacher, listed, tmp_path / "from-list")
    del listed

    live = [0]
    peak = [0]
    read = ShardedRecords.__getitem__

    def counted(self: ShardedRecords, i: Any) -> Any:
        rec = read(self, i)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(rec, lambda: live.__setitem__(0, live[0] - 1))
        return rec

    monkeypatch.setattr(ShardedRecords, "__getitem__", counted)
    result = _build(teacher, sharded, tmp_path / "streamed")
    assert 0 < peak[0] <= PER_SHARD, f"{peak[0]} records were held at once; one shard has {PER_SHARD}"
    assert (result.n_samples, result.n_captions) == (listed_result.n_samples, listed_result.n_captions)

    a, b = _files(tmp_path / "from-list"), _files(tmp_path / "streamed")
    stamps = {k for k in b if k.endswith("/shard.json")}
    assert len(stamps) == SHARDS  # the streamed build records each shard's stamp beside its segment
    assert set(a) == set(b) - stamps
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def _cached_run(tmp_path: Path, spec: str, train: str = "", **data: Any) -> tuple[Any, Any]:
    """The data and the teacher of a cached distill over ``spec``, set up as `mmkd distill` starts one."""
    from test_cache import STUDENT

    from mmkd.config import load_config
    from mmkd.dist import DistInfo
    from mmkd.run_setup import prepare

    extra = "".join(f", {k}: {v}" for k, v in data.items())
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
teacher: cache:{tmp_path / 'tc'}
out: {tmp_path / 'run'}
cache_dir: {tmp_path / 'dc'}
{STUDENT}
data: {{train: "wds:{spec}", batch_size: 4, augment: true{extra}}}
objectives: [{{name: clip}}, {{name: fd_mse}}]
train: {{steps: 2, ckpt_every: 0, threads: 1{train}}}
""")
    run = prepare(load_config(cfg), DistInfo(), lambda _: None)
    return run.data, run.targets


def _count_sample_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from mmkd.data.shards import ShardStore

    reads = [0]
    read = ShardStore.read

    def counted(self: ShardStore, *a: Any) -> bytes:
        reads[0] += 1
        return read(self, *a)

    monkeypatch.setattr(ShardStore, "read", counted)
    return reads


def test_cached_distill_checks_shards_without_reading_samples_and_refuses_a_changed_one(
        teacher: DualEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmkd.teacher.cache import CacheFingerprintError

    spec = _shards(tmp_path / "data")
    _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
    open_shards(spec, tmp_path / "dc", BadSamples())  # the index exists: starting a run reads no sample
    reads = _count_sample_reads(monkeypatch)
    _cached_run(tmp_path, spec)
    assert reads[0] == 0, f"checking the cache read {reads[0]} sample(s)"

    rng = np.random.default_rng(1)  # part-1 rewritten: the same keys and captions, other (larger) images
    _tar(tmp_path / "data" / "part-1.tar", {f"p1s{i}": (rng.integers(0, 256, (28, 24, 3), dtype=np.uint8),
                                                        f"thing 1 {i % 3}") for i in range(PER_SHARD)})
    with pytest.raises(CacheFingerprintError, match=r"built for other data.*part-1\.tar.*ignore_cache_fingerprint"):
        _cached_run(tmp_path, spec)
    _cached_run(tmp_path, spec, train=", ignore_cache_fingerprint: true")  # overridable, as the other parts are


def test_a_shard_rewritten_at_the_same_size_is_refused_by_name_until_its_segment_is_rebuilt(
        teacher: DualEncoder, tmp_path: Path) -> None:
    """Issue 19 item 7: tar pads to 10,240-byte records, so new images of the same shape keep the shard's size; the
    shard's SHA-256 (recorded by the indexing pass and the cache) tells the change."""
    import json
    import shutil

    from mmkd.teacher.cache import CacheFingerprintError

    spec = _shards(tmp_path / "data")
    _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
    shard = tmp_path / "data" / "part-1.tar"
    size = shard.stat().st_size
    rng = np.random.default_rng(7)  # the same keys, captions and image shapes; other pixels
    _tar(shard, {f"p1s{i}": (rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), f"thing 1 {i % 3}")
                 for i in range(PER_SHARD)})
    assert shard.stat().st_size == size  # the stamp of 7b79a9b (name, size, count) cannot tell
    with pytest.raises(CacheFingerprintError, match=r"1 shard\(s\) changed since the cache was built: '[^']*part-1"
                                                    r"\.tar' \(same size, content SHA-256.*delete each one's folder "
                                                    r"\(e\.g\. (\S+)\) and rerun the same `mmkd cache`") as e:
        _cached_run(tmp_path, spec)
    assert "\n" not in str(e.value)
    segment = Path(str(e.value).split("(e.g. ", 1)[1].split(")", 1)[0])
    assert json.loads((segment / "shard.json").read_text())["name"].endswith("part-1.tar")
    shutil.rmtree(segment)  # what the message says to do
    _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
    _cached_run(tmp_path, spec)  # the rebuilt segment serves the new images


def test_a_cache_without_shard_digests_is_refused_until_mmkd_cache_records_them(
        teacher: DualEncoder, tmp_path: Path) -> None:
    """A cache built before shard digests existed: refused (a same-size rewrite would go unnoticed) until a rerun
    of the same build, which computes nothing for complete segments, checks them and records the digests."""
    import json

    from mmkd.teacher.cache import CacheFingerprintError

    spec = _shards(tmp_path / "data")
    _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
    stamps = sorted((tmp_path / "tc" / "segments").glob("*/shard.json"))
    for p in stamps:  # as an older mmkd wrote them
        p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "sha256"}))
    with pytest.raises(CacheFingerprintError, match=r"no content digest for 3 shard\(s\).*rerun the same `mmkd "
                                                    r"cache` command once"):
        _cached_run(tmp_path, spec)
    result = _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
    assert result.chunks_built == 0
    assert all("sha256" in json.loads(p.read_text()) for p in stamps)
    _cached_run(tmp_path, spec)


def test_cached_targets_are_looked_up_in_the_workers_and_equal_in_process(
        teacher: DualEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from mmkd.teacher.cache import CachedTeacher

    spec = _shards(tmp_path / "data")
    _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
    calls = tmp_path / "calls"
    call = CachedTeacher.__call__

    def logged(self: CachedTeacher, batch: Any) -> Any:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        return call(self, batch)

    monkeypatch.setattr(CachedTeacher, "__call__", logged)
    data, cache = _cached_run(tmp_path, spec)
    runs = {}
    for workers in (0, 2):
        calls.unlink(missing_ok=True)
        runs[workers] = [b.targets for b in data.batches(0, 4, workers=workers)]
        pids = set(calls.read_text().split())
        if workers:
            assert str(os.getpid()) not in pids and len(pids) >= 1
        else:
            assert pids == {str(os.getpid())}
    for a, b in zip(runs[0], runs[2], strict=True):
        assert a is not None and a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_a_cache_built_with_one_jpeg_decoder_is_refused_where_training_decodes_with_the_other(
        teacher: DualEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmkd.data import decode
    from mmkd.teacher.cache import CachedTeacher, CacheExpectation, CacheFingerprintError
    from mmkd.teacher.cache.format import read_meta

    pytest.importorskip("simplejpeg")
    spec = _shards(tmp_path / "data")
    _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
    assert read_meta(tmp_path / "tc")["fingerprint"]["transform"]["decoder"] == "simplejpeg"
    cache = CachedTeacher.open(tmp_path / "tc")
    cache.check(CacheExpectation(decoder=decode.jpeg_decoder().name))
    real = decode._import
    monkeypatch.setattr(decode, "_import", lambda m: None if m == "simplejpeg" else real(m))  # not installed
    assert decode.jpeg_decoder().name == "pil"
    with pytest.raises(CacheFingerprintError, match=r"transform\.decoder: .*simplejpeg.*pil.*ignore_cache_fingerp"):
        _cached_run(tmp_path, spec)
    _cached_run(tmp_path, spec, train=", ignore_cache_fingerprint: true")
    with pytest.raises(CacheError, match=r"other settings.*transform\.decoder"):  # nor grown with the other one
        _build(teacher, open_shards(spec, tmp_path / "dc", BadSamples()), tmp_path / "tc")
