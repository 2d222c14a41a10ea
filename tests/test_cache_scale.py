"""The teacher cache at dataset scale: segments per data shard (a grown dataset costs only its new shards, the old
segments' files untouched), partial caches refused or restricted by name, exact lookups under hash collisions,
and reading in DataLoader worker processes."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_cache import STUDENT, make_records

from mmkd.cli import main
from mmkd.data.records import Record
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.hub import save_dual_encoder
from mmkd.teacher.cache import BuildSpec, CachedTeacher, CacheError, CacheExpectation, build_cache, verify_cache
from mmkd.teacher.cache import build as cache_build
from mmkd.teacher.cache import format as cache_format

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread



def _build(teacher: DualEncoder, records: list[Record], out: Path, **kw: Any) -> Any:
    kw = {"views": 2, "dtype": "float32", "chunk_rows": 4, "batch_size": 8, "precision": "fp32", **kw}
    return build_cache(teacher, records, out, BuildSpec(**kw))


def _stat(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_added_shards_are_cached_without_touching_or_recomputing_the_old_ones(
        teacher: DualEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = make_records(30, per_shard=6)  # 5 shards of 6
    first = _build(teacher, records[:18], tmp_path / "c")
    assert (first.segments_built, first.segments_skipped) == (3, 0)
    segments = tmp_path / "c" / "segments"
    old = {p.name: _stat(p) for p in segments.iterdir()}
    assert len(old) == 3
    # the manifest is all a reader needs: 18 keys, found without a dict
    assert CachedTeacher.open(tmp_path / "c").n_samples == 18

    seen: list[int] = []
    real = cache_build.teacher_outputs

    def counting(model: Any, pixels: Any, texts: Any, **kw: Any) -> Any:
        seen.append(len(pixels) if pixels is not None else 0)
        return real(model, pixels, texts, **kw)

    monkeypatch.setattr(cache_build, "teacher_outputs", counting)
    grown = _build(teacher, records, tmp_path / "c")
    assert (grown.segments_built, grown.segments_skipped) == (2, 3)
    assert sum(seen) == 12 * 2  # the teacher saw the 12 new samples × 2 views, none of the old shards' images
    for name, files in old.items():  # same bytes, same modification times
        assert _stat(segments / name) == files, name

    monkeypatch.setattr(cache_build, "teacher_outputs", real)
    fresh = _build(teacher, records, tmp_path / "fresh")
    assert fresh.segments_built == 5
    a, b = CachedTeacher.open(tmp_path / "c"), CachedTeacher.open(tmp_path / "fresh")
    keys = [r.key for r in records]
    torch.testing.assert_close(a.images(keys, [1] * 30)["image_embeds"], b.images(keys, [1] * 30)["image_embeds"],
                               atol=1e-6, rtol=0)
    caps = sorted({c for r in records for c in r.captions})
    torch.testing.assert_close(a.texts(caps)["text_embeds"], b.texts(caps)["text_embeds"], atol=1e-6, rtol=0)
    assert verify_cache(tmp_path / "c").ok
    # the folders are the same: one segment per shard, whatever order they were built in
    assert sorted(p.name for p in segments.iterdir()) == sorted(p.name for p in (tmp_path / "fresh" / "segments")
                                                                .iterdir())


def test_a_partly_built_cache_names_the_shards_it_lacks(teacher: DualEncoder, tmp_path: Path) -> None:
    records = make_records(30, per_shard=6)
    _build(teacher, records[:12], tmp_path / "c")
    cache = CachedTeacher.open(tmp_path / "c")
    with pytest.raises(CacheError, match=r"lacks 3 of the training data's 5 shard\(s\).*'/data/part-2.tar', "
                                         r"'/data/part-3.tar', '/data/part-4.tar'.*data.only_cached_shards: true"):
        cache.check(CacheExpectation(records=records, arrays=("image_embeds", "text_embeds")))
    kept, lacking = cache.restrict(records)
    assert [r.key for r in kept] == [r.key for r in records[:12]]
    assert lacking == ["/data/part-2.tar", "/data/part-3.tar", "/data/part-4.tar"]
    cache.check(CacheExpectation(records=kept, arrays=("image_embeds", "text_embeds")))


def test_segments_finished_before_a_kill_are_published_and_usable(teacher: DualEncoder, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    records = make_records(18, per_shard=6)
    real = cache_build.commit_chunk
    segments: list[str] = []

    def killed_in_the_third_segment(layout: Any, chunk: Any, arrays: Any) -> None:
        segments.append(layout.root.name) if layout.root.name not in segments else None
        if len(segments) == 3:
            raise KeyboardInterrupt("simulated kill")
        real(layout, chunk, arrays)

    monkeypatch.setattr(cache_build, "PUBLISH_EVERY_S", 0.0)  # publish after every segment
    monkeypatch.setattr(cache_build, "PUBLISH_SHARE", 1e9)
    monkeypatch.setattr(cache_build, "commit_chunk", killed_in_the_third_segment)
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, records, tmp_path / "c")
    cache = CachedTeacher.open(tmp_path / "c")
    assert cache.n_samples == 12 and cache.shards == ["/data/part-0.tar", "/data/part-1.tar"]
    kept, lacking = cache.restrict(records)
    assert len(kept) == 12 and lacking == ["/data/part-2.tar"]
    cache.check(CacheExpectation(records=kept))
    monkeypatch.setattr(cache_build, "commit_chunk", real)
    resumed = _build(teacher, records, tmp_path / "c")
    assert (resumed.segments_built, resumed.segments_skipped) == (1, 2)
    assert CachedTeacher.open(tmp_path / "c").n_samples == 18 and verify_cache(tmp_path / "c").ok


def test_lookups_are_exact_when_every_key_collides(teacher: DualEncoder, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    records = make_records(20, per_shard=7)
    _build(teacher, records, tmp_path / "plain", views=1)
    plain = CachedTeacher.open(tmp_path / "plain")
    keys = [r.key for r in records][::-1]
    caps = sorted({c for r in records for c in r.captions})
    want_images, want_texts = plain.images(keys)["image_embeds"], plain.texts(caps)["text_embeds"]
    real = cache_format.key_hashes
    monkeypatch.setattr(cache_format, "key_hashes", lambda strings: real(strings) & np.uint64(3))  # 4 hash values
    _build(teacher, records, tmp_path / "collide", views=1)
    collide = CachedTeacher.open(tmp_path / "collide")
    assert sorted(collide.key_index.rows(keys).tolist()) == list(range(20))  # every key its own row
    torch.testing.assert_close(collide.images(keys)["image_embeds"], want_images, atol=0, rtol=0)
    torch.testing.assert_close(collide.texts(caps)["text_embeds"], want_texts, atol=0, rtol=0)
    with pytest.raises(CacheError, match="'s999' is not in the teacher cache"):
        collide.images(["s000", "s999"])  # same hash bucket as cached keys, but not cached
    assert verify_cache(tmp_path / "collide").ok


class _Targets(torch.utils.data.Dataset):
    def __init__(self, cache: CachedTeacher, keys: list[str]) -> None:
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        row = self.cache.images([self.keys[i]], [i % 2])["image_embeds"][0]
        # the maps this process reads are its own, opened here (not the parent's, not shared through pickling)
        return row, os.getpid(), self.cache.key_index._pid == os.getpid() == self.cache._pid


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_cache_through_their_own_maps(teacher: DualEncoder, tmp_path: Path,
                                                                   context: str) -> None:
    records = make_records(12, per_shard=5)
    _build(teacher, records, tmp_path / "c")
    cache = CachedTeacher.open(tmp_path / "c")
    keys = [r.key for r in records]
    want = cache.images(keys, [i % 2 for i in range(12)])["image_embeds"]  # the parent's maps are open: fork copies
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._maps == {} or len(copy._maps) == 0
    torch.testing.assert_close(copy.images(keys, [i % 2 for i in range(12)])["image_embeds"], want, atol=0, rtol=0)
    loader = torch.utils.data.DataLoader(_Targets(cache, keys), batch_size=3, num_workers=2,
                                         multiprocessing_context=context)
    rows, pids, own = [], set(), []
    for r, pid, mine in loader:
        rows.append(r)
        pids.update(pid.tolist())
        own += mine.tolist()
    assert os.getpid() not in pids and len(pids) == 2 and all(own)
    torch.testing.assert_close(torch.cat(rows), want, atol=0, rtol=0)


def _tar(path: Path, samples: dict[str, tuple[np.ndarray, str]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, (img, caption) in samples.items():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_cli_partial_cache_is_refused_then_restricted_then_grown(teacher: DualEncoder, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    for part in range(2):
        _tar(tmp_path / f"part-{part}.tar", {f"p{part}s{i}": (rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                                                              f"thing {part} {i}") for i in range(6)})
    save_dual_encoder(teacher, tmp_path / "teacher")
    base = ["cache", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "tc"), "--chunk-rows", "4",
            "--threads", "1"]
    assert main([*base, "--data", f"wds:{tmp_path}/part-0.tar"]) == 0
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
teacher: cache:{tmp_path / 'tc'}
out: {tmp_path / 'run'}
{STUDENT}
data: {{train: "wds:{tmp_path}/part-{{0..1}}.tar", batch_size: 4}}
objectives: [{{name: clip}}, {{name: fd_mse}}]
train: {{steps: 2, log_every: 1, ckpt_every: 0, warmup_steps: 1, threads: 1}}
""")
    capsys.readouterr()
    assert main(["distill", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "lacks 1 of the training data's 2 shard(s)" in err and "part-1.tar" in err
    assert "data.only_cached_shards: true" in err
    assert main(["distill", str(cfg), "data.only_cached_shards=true"]) == 0
    out = capsys.readouterr().out
    assert "left out 1 shard(s) it lacks" in out and "part-1.tar" in out
    assert main([*base, "--data", f"wds:{tmp_path}/part-{{0..1}}.tar"]) == 0  # grow: only part-1 is computed
    assert "1 shard(s) were cached before" in capsys.readouterr().out
    assert main(["distill", str(cfg), f"out={tmp_path / 'run2'}"]) == 0
    assert main(["cache", "--verify", str(tmp_path / "tc")]) == 0


def test_the_streamed_index_equals_a_stable_sort_of_every_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_index merges the segments block by block (issue 19 item 8: a build's memory must not grow with the
    cache): its four files equal those of one stable argsort over every segment's hashes, ties (forced: 5 hash
    values) in row order, with rounds and gather steps made tiny so that every boundary is crossed."""
    from mmkd.teacher.cache import index as cache_index

    monkeypatch.setattr(cache_index, "MERGE_BLOCK", 7)
    monkeypatch.setattr(cache_index, "GATHER_BYTES", 5)
    rng = np.random.default_rng(0)
    folders, all_strings, all_hashes = [], [], []
    for j, n in enumerate([13, 0, 1, 40, 9]):
        folder = tmp_path / f"seg{j}"
        folder.mkdir()
        strings = [f"s{j}-{i}-" + "x" * int(rng.integers(0, 6)) for i in range(n)]
        hashes = (cache_format.key_hashes(strings) % np.uint64(5)).astype("<u8")
        cache_format.write_strings(folder, "captions", strings)
        cache_format.write_npy(folder / "captions.hash.npy", hashes)
        folders.append(folder)
        all_strings += strings
        all_hashes.append(hashes)
    cache_index.write_index(tmp_path, "g", "captions", folders, [""] * len(folders), unique=True)
    flat = np.concatenate(all_hashes)
    order = np.argsort(flat, kind="stable")
    paths = cache_index.index_paths(tmp_path, "g", "captions")
    got = {part: np.load(p, allow_pickle=False) for part, p in paths.items()}
    assert got["hash"].dtype == np.dtype("<u8") and (got["hash"] == flat[order]).all()
    assert got["row"].dtype == np.dtype("<i8") and (got["row"] == order).all()
    strings = [got["bytes"][int(a):int(b)].tobytes().decode() for a, b in zip(got["offsets"][:-1], got["offsets"][1:])]
    assert strings == [all_strings[i] for i in order]
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(p.name for p in paths.values())
    # a key in two segments is refused naming both, as before (real hashes: a duplicate's copies are adjacent)
    for j, strings in enumerate([["a", "b", "c"], ["d", "b"]]):
        cache_format.write_strings(folders[j], "keys", strings)
        cache_format.write_npy(folders[j] / "keys.hash.npy", cache_format.key_hashes(strings))
    with pytest.raises(CacheError, match=r"sample key 'b' is in two segments of .*: seg0 \(shard in memory\) and "
                                         r"seg1 \(shard in memory\)"):
        cache_index.write_index(tmp_path, "h", "keys", folders[:2], ["", ""], unique=True)
    assert not any("tmp-" in p.name for p in (tmp_path / "index").iterdir())


def test_writing_the_index_takes_memory_independent_of_the_cache_size(tmp_path: Path) -> None:
    """Issue 19 item 8: growing a 300k-sample cache by one shard jumped ~140 MB while its index was written (7b79a9b
    concatenated every segment's strings and built 8-byte index arrays per byte of them). Peak traced allocation
    (numpy reports to tracemalloc) while indexing 10 vs 50 segments of 2,000 strings each."""
    import tracemalloc

    from mmkd.teacher.cache import index as cache_index

    def peak(segments: int) -> int:
        root = tmp_path / f"c{segments}"
        folders = []
        for j in range(segments):
            folder = root / "segments" / f"s{j}"
            folder.mkdir(parents=True)
            strings = [f"a caption of sample {j}-{i}, long enough to look like one" for i in range(2000)]
            cache_format.write_strings(folder, "captions", strings)
            cache_format.write_npy(folder / "captions.hash.npy", cache_format.key_hashes(strings))
            folders.append(folder)
        tracemalloc.start()
        try:
            cache_index.write_index(root, "g", "captions", folders, [""] * segments, unique=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(10), peak(50)
    assert large < 1.3 * small + (1 << 20), f"peak {large / 2**20:.1f} MiB at 50 segments, {small / 2**20:.1f} at 10"
