"""The teacher cache: exact view replay, resume after a crash, fingerprints, damage detection, 2 ranks = 1 rank,
and distillation from ``teacher: cache:DIR`` that never loads or runs the teacher."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_dual_encoder
from PIL import Image
from tiny_runs import NEW_STUDENT_YAML

from mmkd import dist as mdist
from mmkd.cli import main
from mmkd.data import transforms
from mmkd.data.batches import ImageBank, TrainData
from mmkd.data.records import Record
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.hub import save_dual_encoder
from mmkd.teacher.cache import (
    BuildSpec,
    CachedTeacher,
    CacheError,
    CacheExpectation,
    CacheFingerprintError,
    build_cache,
    verify_cache,
)
from mmkd.teacher.cache import build as cache_build
from mmkd.teacher.targets import teacher_outputs

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
N, VIEWS = 40, 3


def make_records(n: int = N, seed: int = 0, per_shard: int = 0) -> list[Record]:
    """Non-square images larger than the model size, so augmented crops really differ between views. per_shard:
    records come from data shards of that many samples (``/data/part-K.tar``), else from memory (one segment)."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 40, 48, 3), dtype=np.uint8)
    return [Record(f"s{i:03d}", imgs[i], (f"a shape number {i}", f"thing {i % 5}"), origin=f"sample {i}",
                   shard=f"/data/part-{i // per_shard}.tar" if per_shard else "") for i in range(n)]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread



@pytest.fixture(scope="module")
def records() -> list[Record]:
    return make_records()


def _build(teacher: DualEncoder, records: list[Record], out: Path, **kw: Any) -> Any:
    kw = {"views": VIEWS, "dtype": "float32", "features": True, "chunk_rows": 8, "batch_size": 8,
          "precision": "fp32", **kw}
    return build_cache(teacher, records, out, BuildSpec(**kw))


# -------------------------------------------------------------------------------------------------- replay


def test_replayed_view_is_the_cached_view(teacher: DualEncoder, records: list[Record], tmp_path: Path) -> None:
    _build(teacher, records, tmp_path / "c", seed=7)
    cache = CachedTeacher.open(tmp_path / "c")
    m = teacher.meta
    # the student sees the teacher's resolution here, so its pixels must be exactly the teacher's input
    bank = cache.bank(records, m.image_size, m.image_mean, m.image_std)
    assert bank.augment and bank.seed == 7
    data = TrainData(bank, None, 16, 0, world=1, seed=3, views=cache.views)
    cache.check(CacheExpectation.for_data(data, arrays=("image_embeds", "image_features", "text_embeds")))
    seen_views: set[int] = set()
    for step in range(3):
        batch = data.batch(step)
        seen_views.update(batch.views)
        cached = cache(batch)
        fresh = teacher_outputs(teacher.eval(), batch.pixel_values, batch.captions, features=True)
        for name in ("image_embeds", "image_features", "text_embeds", "text_features"):
            torch.testing.assert_close(cached[name], fresh[name], atol=2e-5, rtol=1e-4, msg=name)
    assert seen_views == {0, 1, 2}
    # the views are really different images: the cached rows of one sample differ per view
    rows = [cache.images(["s000"], [v])["image_embeds"] for v in range(VIEWS)]
    assert not torch.allclose(rows[1], rows[2], atol=1e-3) and not torch.allclose(rows[0], rows[1], atol=1e-3)


def test_student_at_another_resolution_replays_the_same_crops(teacher: DualEncoder, records: list[Record],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    _build(teacher, records[:8], tmp_path / "c", views=2, features=False)
    cache = CachedTeacher.open(tmp_path / "c")
    boxes: list[tuple] = []
    real = transforms.random_resized_crop_box

    def record_box(*a: Any, **k: Any) -> tuple:
        boxes.append(real(*a, **k))
        return boxes[-1]

    monkeypatch.setattr(transforms, "random_resized_crop_box", record_box)
    idx, views = list(range(8)), [1, 0, 1, 1, 0, 1, 1, 1]
    teacher_bank = cache.bank(records[:8], 32, MEAN, STD)
    teacher_bank.pixels(idx, views)
    teacher_boxes, boxes[:] = list(boxes), []
    student_bank = cache.bank(records[:8], 16, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3))
    assert student_bank.pixels(idx, views).shape == (8, 3, 16, 16)
    assert boxes == teacher_boxes and len(boxes) == 6


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open descriptors through /proc/self/fd")
def test_reading_more_shards_than_the_open_files_limit_leaves_the_limit_alone(
        teacher: DualEncoder, records: list[Record], tmp_path: Path) -> None:
    """Each shard map holds a descriptor: the reader keeps a bounded number open instead of raising the process's
    RLIMIT_NOFILE (a process-wide setting a library must not change behind its caller's back)."""
    import resource

    _build(teacher, records, tmp_path / "c", views=1, features=False, chunk_rows=1)  # 40 + 45 one-row shards
    reference = CachedTeacher.open(tmp_path / "c")
    keys, captions = [r.key for r in records], reference.captions
    want = {**reference.images(keys), **reference.texts(captions)}
    del reference
    shards = len(list((tmp_path / "c" / "segments" / "memory").glob("*-0*.npy")))
    spare = shards // 2  # fewer spare descriptors than the cache has shards
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + spare
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        cache = CachedTeacher.open(tmp_path / "c")
        order = np.random.default_rng(0).permutation(len(keys))
        got = {**cache.images([keys[i] for i in order]), **cache.texts(captions[::-1])}
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (low, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    torch.testing.assert_close(got["image_embeds"], want["image_embeds"][torch.as_tensor(order)], rtol=0, atol=0)
    torch.testing.assert_close(got["text_embeds"], want["text_embeds"].flip(0), rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- resume


def test_interrupted_build_resumes_to_the_same_cache(teacher: DualEncoder, records: list[Record], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _build(teacher, records, tmp_path / "ref")
    assert ref.chunks_built == 5 + 6  # 40 samples / 8 + 45 distinct captions / 8
    real_commit = cache_build.commit_chunk
    calls = {"n": 0}

    def crash_on_fourth(layout: Any, chunk: Any, arrays: dict[str, np.ndarray]) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            # what a kill mid-write leaves: a half-written shard under its final name, a temp file, no marker
            name = next(iter(arrays))
            layout.shard(chunk, name).write_bytes(b"\x93NUMPY" + b"\0" * 50)
            (layout.root / f".{chunk.name}.{name}.npy.tmp-999-1").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated kill")
        real_commit(layout, chunk, arrays)

    monkeypatch.setattr(cache_build, "commit_chunk", crash_on_fourth)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, records, out)
    monkeypatch.setattr(cache_build, "commit_chunk", real_commit)
    committed = sorted(p.name for p in (out / "segments" / "memory").glob("*.done.json"))
    assert len(committed) == 3  # the fourth chunk never committed

    with pytest.raises(CacheError, match="incomplete.*rerun"):
        CachedTeacher.open(out)
    report = verify_cache(out)
    assert not report.ok and any("not written" in p for p in report.problems)

    resumed = _build(teacher, records, out)
    assert (resumed.chunks_skipped, resumed.chunks_built) == (3, 8)
    assert files(out) == files(tmp_path / "ref")  # byte for byte: no duplicated, missing or half-written row
    assert verify_cache(out).ok
    again = _build(teacher, records, out)  # a complete cache: nothing to do
    assert (again.chunks_skipped, again.chunks_built) == (11, 0)


@pytest.mark.parametrize("threaded", [True, False])
def test_prefetcher_yields_every_job_in_order_and_surfaces_errors(threaded: bool) -> None:
    jobs = [(i, (lambda i=i: i * i)) for i in range(7)]
    assert list(cache_build.Prefetcher(iter(jobs), threaded=threaded)) == [(i, i * i) for i in range(7)]

    def broken() -> int:
        raise OSError("image 3 unreadable")

    p = cache_build.Prefetcher(iter([*jobs[:3], (3, broken)]), threaded=threaded)
    with pytest.raises(OSError, match="image 3 unreadable"):
        list(p)
    p.close()


def test_prefetch_thread_only_where_a_core_is_free_or_the_teacher_is_on_an_accelerator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_build.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cache_build.torch, "get_num_threads", lambda: 4)
    assert not cache_build.prefetch_pays("cpu") and cache_build.prefetch_pays("cuda")
    monkeypatch.setattr(cache_build.torch, "get_num_threads", lambda: 3)
    assert cache_build.prefetch_pays("cpu")


def test_resume_with_other_settings_is_refused(teacher: DualEncoder, records: list[Record], tmp_path: Path) -> None:
    _build(teacher, records[:8], tmp_path / "c")
    before = files(tmp_path / "c")
    with pytest.raises(CacheError, match=r"other settings.*views: this build 2, the folder 3"):
        _build(teacher, records[:8], tmp_path / "c", views=2)
    with pytest.raises(CacheError, match="data.sha256"):
        _build(teacher, make_records(8, seed=1), tmp_path / "c")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not an mmkd teacher cache"):
        _build(teacher, records[:8], tmp_path / "other")
    assert files(tmp_path / "c") == before
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_plain_captioned_bank_with_augmented_unpaired_bank(teacher: DualEncoder, records: list[Record],
                                                            tmp_path: Path) -> None:
    """Captioned images may keep view 0 while uncaptioned ones replay the cached crops (the demo's default); only
    banks that augment must agree on the view seed and crops."""
    _build(teacher, records, tmp_path / "c", seed=7)
    cache = CachedTeacher.open(tmp_path / "c")
    m = teacher.meta
    plain = ImageBank(records[:16], m.image_size, m.image_mean, m.image_std)  # no augmentation, any seed
    data = TrainData(plain, cache.bank(records[16:], m.image_size, m.image_mean, m.image_std), 8, 8, world=1,
                     seed=3, views=cache.views)
    expect = CacheExpectation.for_data(data, arrays=("image_embeds", "text_embeds"))
    assert expect.augment and expect.view_seed == 7
    cache.check(expect)
    batch = data.batch(0)
    assert batch.views[:batch.n_paired] == [0] * batch.n_paired and any(batch.views[batch.n_paired:])
    fresh = teacher_outputs(teacher.eval(), batch.pixel_values, batch.captions)
    torch.testing.assert_close(cache(batch)["image_embeds"], fresh["image_embeds"], atol=2e-5, rtol=1e-4)
    other = ImageBank(records[:16], m.image_size, m.image_mean, m.image_std, augment=True, seed=8,
                      augmentation=cache.augmentation)
    with pytest.raises(CacheError, match="different view seeds or augmentation"):
        CacheExpectation.for_data(TrainData(other, data.unpaired, 8, 8, world=1, seed=3, views=cache.views))


# ------------------------------------------------------------------------------------------- fingerprints, keys


def test_fingerprint_mismatch_is_refused_unless_overridden(teacher: DualEncoder, records: list[Record],
                                                           tmp_path: Path) -> None:
    _build(teacher, records, tmp_path / "c", seed=1)
    cache = CachedTeacher.open(tmp_path / "c")
    changed = list(records)
    img = changed[5].image.copy()
    img[0, 0] ^= 255
    changed[5] = Record(changed[5].key, img, changed[5].captions, origin="sample 5")
    with pytest.raises(CacheFingerprintError, match=r"1 sample\(s\) differ.*'s005' \(sample 5\).*ignore_cache"):
        cache.check(CacheExpectation(records=changed))
    with pytest.raises(CacheFingerprintError, match=r"transform.augmentation.scale"):
        cache.check(CacheExpectation(augmentation={"scale": [0.3, 1.0], "ratio": [0.75, 4 / 3], "hflip": False}))
    with pytest.raises(CacheFingerprintError, match="view_seed"):
        cache.check(CacheExpectation(view_seed=0))
    with pytest.raises(CacheFingerprintError, match="weights"):
        cache.check(CacheExpectation(teacher_sha256="0" * 64))
    cache.check(CacheExpectation(records=changed, view_seed=0, teacher_sha256="0" * 64, ignore_fingerprint=True))
    cache.check(CacheExpectation(records=records, view_seed=1, augmentation=cache.augmentation))
    # hard requirements are never overridable
    with pytest.raises(CacheError, match="embeddings are 24-wide, expected 32"):
        cache.check(CacheExpectation(embed_dim=32, ignore_fingerprint=True))
    with pytest.raises(CacheError, match="holds 3 view"):
        cache.check(CacheExpectation(views=5, ignore_fingerprint=True))


def test_missing_key_caption_and_arrays_are_named(teacher: DualEncoder, records: list[Record], tmp_path: Path
                                                  ) -> None:
    _build(teacher, records[:10], tmp_path / "c", views=1, features=False)
    cache = CachedTeacher.open(tmp_path / "c")
    extra = Record("new-sample", records[20].image, ("a caption nobody cached",), origin="pairs.jsonl line 21")
    with pytest.raises(CacheError, match=r"1 training sample\(s\) are not in it, e.g. key 'new-sample' "
                                         r"\(pairs.jsonl line 21\)") as e:
        cache.check(CacheExpectation(records=[*records[:10], extra], arrays=("image_embeds", "text_embeds"),
                                     ignore_fingerprint=True))
    assert "a caption nobody cached" in str(e.value)
    with pytest.raises(CacheError, match="'new-sample' is not in the teacher cache"):
        cache.images(["s001", "new-sample"])
    with pytest.raises(CacheError, match="caption 'nope' is not in the teacher cache"):
        cache.texts(["nope"])
    with pytest.raises(CacheError, match="view 1 is not in the teacher cache"):
        cache.images(["s001"], [1])
    with pytest.raises(CacheError, match="no image_features.*--features"):
        cache.check(CacheExpectation(arrays=("image_embeds", "image_features")))
    with pytest.raises(CacheError, match="only view 0"):
        cache.check(CacheExpectation(augment=True))


# -------------------------------------------------------------------------------------------------- damage


def test_truncated_shard_is_named_and_nothing_is_overwritten(teacher: DualEncoder, records: list[Record],
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    root = tmp_path / "c"
    _build(teacher, records[:16], root)
    shard = root / "segments" / "memory" / "image-00001.image_embeds.npy"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    before = files(root)
    with pytest.raises(CacheError, match=rf"{shard}.*truncated.*Nothing was changed.*image-00001.done.json"):
        CachedTeacher.open(root)
    with pytest.raises(CacheError, match=rf"{shard}.*truncated"):
        _build(teacher, records[:16], root)  # a resume must not paper over a damaged committed chunk
    assert main(["cache", "--verify", str(root)]) == 1
    assert str(shard) in capsys.readouterr().err
    assert files(root) == before

    # the fix the message gives works: drop the chunk's marker, rerun, the chunk is recomputed
    (root / "segments" / "memory" / "image-00001.done.json").unlink()
    assert _build(teacher, records[:16], root).chunks_built == 1
    assert verify_cache(root).ok


def test_verify_detects_flipped_bytes(teacher: DualEncoder, records: list[Record], tmp_path: Path) -> None:
    root = tmp_path / "c"
    _build(teacher, records[:8], root, features=False)
    shard = root / "segments" / "memory" / "text-00000.text_embeds.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x40
    shard.write_bytes(bytes(raw))
    CachedTeacher.open(root)  # sizes are right: opening stays cheap and does not hash
    report = verify_cache(root)
    assert not report.ok and any(str(shard) in p and "checksum" in p for p in report.problems)


def test_bfloat16_and_float16_storage_round_trip(teacher: DualEncoder, records: list[Record], tmp_path: Path
                                                 ) -> None:
    ref = None
    for dtype, tol in (("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)):
        _build(teacher, records[:8], tmp_path / dtype, dtype=dtype, views=2, features=False)
        got = CachedTeacher.open(tmp_path / dtype).images([r.key for r in records[:8]], [1] * 8)["image_embeds"]
        assert got.dtype == torch.float32
        ref = got if ref is None else ref
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
        assert verify_cache(tmp_path / dtype).ok


# -------------------------------------------------------------------------------------------------- 2 ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build_worker(rank: int, world: int, port: int, tok_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    info = mdist.init_distributed()
    assert info.world_size == world
    result = build_cache(tiny_dual_encoder(tok_path), make_records(per_shard=10), out,
                         BuildSpec(views=VIEWS, features=True, chunk_rows=8, batch_size=8))
    (Path(out).parent / f"rank{rank}.json").write_text(json.dumps({"built": result.chunks_built}))
    torch.distributed.destroy_process_group()


def test_two_process_build_equals_one_process_build(minilm_path: str, tmp_path: Path) -> None:
    """Rank r builds the segments of data shards r, r + 2, ...; rank 0 publishes the manifest after a barrier."""
    ctx = mp.start_processes(_build_worker, args=(2, _free_port(), minilm_path, str(tmp_path / "two")), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2 cache-building processes did not finish within 180 s")
    one = build_cache(tiny_dual_encoder(minilm_path), make_records(per_shard=10), tmp_path / "one",
                      BuildSpec(views=VIEWS, features=True, chunk_rows=8, batch_size=8))
    built = [json.loads((tmp_path / f"rank{r}.json").read_text())["built"] for r in range(2)]
    # 4 shards of 10 samples: per segment 2 image chunks + 2 text chunks (15 captions); 2 segments per rank
    assert sum(built) == one.chunks_built == 16 and built == [8, 8]
    a, b = files(tmp_path / "two"), files(tmp_path / "one")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


# ---------------------------------------------------------------------------------------- distill from a cache


STUDENT = NEW_STUDENT_YAML


def _jsonl(tmp_path: Path, records: list[Record]) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for r in records:
        Image.fromarray(r.image).save(tmp_path / "img" / f"{r.key}.png")
        lines.append(json.dumps({"image": f"img/{r.key}.png", "captions": list(r.captions), "key": r.key}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_config(tmp_path: Path, cache: Path, data: Path, extra: str = "") -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
teacher: cache:{cache}
out: {tmp_path / 'run'}
{STUDENT}
data: {{train: "jsonl:{data}", batch_size: 8, augment: true}}
objectives:
  - {{name: clip}}
  - {{name: fd_mse, towers: [image, text]}}
  - {{name: fd_cosine, towers: [image, text], params: {{level: features}}}}
  - {{name: fd_mse_cosine, towers: [image, text], params: {{level: features}}}}
  - {{name: fd_mse_cosine, towers: [image, text]}}
train: {{steps: 3, log_every: 1, ckpt_every: 0, warmup_steps: 1, threads: 1}}
{extra}""")
    return cfg


def test_distill_from_cache_never_loads_or_runs_the_teacher(
        tiny_teacher_dir: Path, records: list[Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = _jsonl(tmp_path, records[:16])
    cache = tmp_path / "tc"
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", f"jsonl:{data}", "--out", str(cache),
                 "--views", "2", "--features", "--chunk-rows", "8", "--threads", "1"]) == 0
    assert main(["cache", "--verify", str(cache)]) == 0
    assert "OK" in capsys.readouterr().out

    def forbidden(*a: Any, **k: Any) -> Any:
        raise AssertionError("the teacher was loaded or run during distillation from a cache")

    import mmkd.models.hub
    import mmkd.run_setup
    import mmkd.teacher.targets

    monkeypatch.setattr(mmkd.models.hub, "load_dual_encoder", forbidden)
    monkeypatch.setattr(mmkd.run_setup, "load_dual_encoder", forbidden)
    monkeypatch.setattr(mmkd.teacher.targets, "teacher_outputs", forbidden)
    monkeypatch.setattr(cache_build, "teacher_outputs", forbidden)
    monkeypatch.setattr(mmkd.teacher.targets.OnlineTeacher, "__init__", forbidden)

    cfg = _run_config(tmp_path, cache, data)
    assert main(["distill", str(cfg)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = set(lines[-1])
    for t in ("clip", "fd_mse/mse_image", "fd_mse/mse_text", "fd_cosine/cosine_image", "fd_cosine/cosine_text",
              "fd_mse_cosine/mse_image", "fd_mse_cosine/cosine_text"):
        assert t in terms, t
    assert all(np.isfinite(v) for line in lines for k, v in line.items() if k != "step")

    # the data changed since the cache was built: refused, naming the sample and the override
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "img" / "s003.png")
    capsys.readouterr()
    assert main(["distill", str(cfg), f"out={tmp_path / 'run2'}"]) == 2
    err = capsys.readouterr().err
    assert "'s003'" in err and "ignore_cache_fingerprint" in err and "--ignore-fingerprint" in err
    assert main(["distill", str(cfg), f"out={tmp_path / 'run3'}", "--ignore-fingerprint"]) == 0

    # logit and relational objectives read the cached embeddings and the teacher's logit scale
    relational = "objectives=[{name: clip}, {name: kl}, {name: crd}, {name: rkd}, {name: icl}]"
    assert main(["distill", str(cfg), relational, f"out={tmp_path / 'run5'}", "--ignore-fingerprint"]) == 0
    last = json.loads((tmp_path / "run5" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"kl/i2t", "kl/t2i", "crd/i2t", "crd/t2i", "rkd/distance_image", "rkd/angle_text", "icl/i2t"} <= set(last)
    assert all(np.isfinite(v) for k, v in last.items() if k != "step")

    # a student that needs the teacher's weights cannot be built from a cache
    assert main(["distill", str(cfg), "student.vision.source=teacher", f"out={tmp_path / 'run4'}",
                 "--ignore-fingerprint"]) == 2
    assert "source: new" in capsys.readouterr().err


def test_distill_refuses_a_cache_without_what_the_objectives_need(
        teacher: DualEncoder, records: list[Record], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _jsonl(tmp_path, records[:16])
    from mmkd.data.resolve import records_from_spec

    build_cache(teacher, records_from_spec(f"jsonl:{data}"), tmp_path / "tc", BuildSpec(views=1, chunk_rows=8))
    cfg = _run_config(tmp_path, tmp_path / "tc", data)
    assert main(["distill", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "--features" in err and "only view 0" in err


def test_cache_command_takes_the_data_of_a_distill_config(teacher: DualEncoder, records: list[Record],
                                                          tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pairs = _jsonl(tmp_path / "a", records[:16])
    extra = _jsonl(tmp_path / "b", [Record(f"x{i}", records[30 + i].image, ("unused caption",)) for i in range(6)])
    save_dual_encoder(teacher, tmp_path / "teacher")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
teacher: cache:{tmp_path / 'tc'}
{STUDENT}
data: {{train: "jsonl:{pairs}", limit: 12, unpaired: "jsonl:{extra}", unpaired_batch_size: 2, batch_size: 4}}
objectives: [{{name: clip}}, {{name: fd_mse, towers: [image]}}]
""")
    assert main(["cache", "--teacher", str(tmp_path / "teacher"), "--config", str(cfg), "--threads", "1"]) == 0
    cache = CachedTeacher.open(tmp_path / "tc")
    assert cache.keys == [r.key for r in records[:12]] + [f"x{i}" for i in range(6)]
    assert cache.captions == sorted({c for r in records[:12] for c in r.captions})  # unpaired captions unused
    assert main(["distill", str(cfg), f"out={tmp_path / 'run'}", "train.steps=1", "train.threads=1"]) == 0
    assert "fd_mse/mse_image" in (tmp_path / "run" / "metrics.jsonl").read_text()  # unpaired keys read too

    from mmkd.config import load_config

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "s3_cached.yaml")
    assert shipped.teacher.startswith("cache:") and shipped.student.vision.source == "new"
