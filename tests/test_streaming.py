"""Streaming WebDataset shards: the O(shards) index, shard-local shuffling, batches identical for any number of
DataLoader workers and processes, remote shard specs (``pipe:``, ``file://``, ``https://``) and their errors."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_tar
from PIL import Image

from mmkd.data.batches import ImageBank, TrainBatch, TrainData
from mmkd.data.plan import ShardPlan
from mmkd.data.records import BadSamples, DataError
from mmkd.data.resolve import records_from_spec
from mmkd.data.sharded import ShardedRecords, open_shards

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def jpeg(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(folder: Path, shards: int = 4, per: int = 10, prefix: str = "s") -> str:
    """``shards`` tars of ``per`` captioned JPEGs each (two captions per sample); returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        members: dict[str, bytes] = {}
        for j in range(per):
            key = f"{prefix}{s:02d}-{j:03d}"
            members[f"{key}.jpg"] = jpeg(s * 1000 + j)
            members[f"{key}.txt"] = f"photo {s} {j}\nanother caption {j % 3}".encode()
        write_tar(folder / f"{prefix}-{s:04d}.tar", members)
    return f"{folder}/{prefix}-{{0000..{shards - 1:04d}}}.tar"


def train_data(records: ShardedRecords, world: int = 1, batch: int = 6) -> TrainData:
    bank = ImageBank(records, 16, MEAN, STD, augment=True, seed=3)
    return TrainData(bank, None, batch, 0, world=world, seed=7, views=3, window=2)


def same(a: TrainBatch, b: TrainBatch) -> bool:
    return (torch.equal(a.pixel_values, b.pixel_values) and a.keys == b.keys and a.captions == b.captions
            and a.views == b.views)


# ------------------------------------------------------------------------------------------------------ plan


def _window_of(plan: ShardPlan, epoch: int, shard: int) -> int:
    """The window that reads ``shard`` in ``epoch``: its place in the epoch's shard order, by windows."""
    order, _ = plan._layout(epoch)
    return int(np.nonzero(order == shard)[0][0]) // plan.window


def test_each_shard_is_read_within_one_window_per_epoch() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 30, size=23)
    plan = ShardPlan(counts, 8, seed=1, name="paired", window=4)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for epoch in range(3):
        seen = np.concatenate([plan.indices(epoch * plan.per_epoch + p) for p in range(plan.per_epoch)])
        assert len(set(seen.tolist())) == len(seen)  # each sample at most once an epoch
        shard = np.searchsorted(offsets, seen, side="right") - 1
        windows = [_window_of(plan, epoch, int(s)) for s in shard]
        assert windows == sorted(windows)  # windows are visited one after the other, never interleaved
        assert len(set(windows)) == -(-len(counts) // 4) or len(seen) < counts.sum()
    # the shard order differs between epochs, and a batch is a pure function of (seed, step)
    assert [_window_of(plan, 0, s) for s in range(23)] != [_window_of(plan, 1, s) for s in range(23)]
    fresh = ShardPlan(counts, 8, seed=1, name="paired", window=4)
    assert np.array_equal(fresh.indices(2 * plan.per_epoch + 5), plan.indices(2 * plan.per_epoch + 5))


def _held_bytes(plan: ShardPlan) -> int:
    arrays = [v for v in vars(plan).values() if isinstance(v, np.ndarray)]
    arrays += list(plan._windows.values()) + [a for a in (plan._epoch or ())[1:]]
    return sum(a.nbytes for a in arrays)


def test_plan_memory_grows_with_shards_not_samples() -> None:
    """100× the samples (as 100× the shards of the same size): the plan holds O(shards) integers plus at most two
    windows' permutations, never an array over the samples."""
    small = ShardPlan([100] * 10, 64, seed=0, name="paired", window=2)
    big = ShardPlan([100] * 1000, 64, seed=0, name="paired", window=2)
    for plan in (small, big):
        for step in (0, 1, 7, plan.per_epoch + 3):
            plan.indices(step)
    window_bytes = 2 * 2 * 100 * 8  # two windows of two 100-sample shards, int64
    assert _held_bytes(small) <= 8 * 4 * 11 + window_bytes
    assert _held_bytes(big) <= 8 * 4 * 1001 + window_bytes  # 4 arrays over shards; 100,000 samples would be 800 kB
    assert _held_bytes(big) < 100_000 * 8 / 10


def test_one_in_memory_shard_keeps_the_old_epoch_permutation() -> None:
    from mmkd.data.plan import rng_of

    plan = ShardPlan([50], 10, seed=4, name="paired")
    assert np.array_equal(plan.indices(6), rng_of(4, "paired", 1).permutation(50)[10:20])


# ------------------------------------------------------------------------------------------------------ index


def test_index_is_built_once_and_spans_are_memory_mapped(tmp_path: Path) -> None:
    spec = write_shards(tmp_path / "d")
    recs = records_from_spec(f"wds:{spec}", tmp_path / "cache", stream=True)
    assert isinstance(recs, ShardedRecords) and len(recs) == 40
    assert isinstance(recs.index.spans, np.memmap)  # never read whole into memory
    assert list(recs.shard_counts) == [10] * 4
    index_dir = next((tmp_path / "cache" / "shards").glob("index-*"))
    stamp = (index_dir / "spans.npy").stat().st_mtime_ns
    again = open_shards(spec, tmp_path / "cache")
    assert (index_dir / "spans.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [again[i].key for i in (0, 17, 39)] == ["s00-000", "s01-007", "s03-009"]
    assert again[17].captions == ("photo 1 7", "another caption 1")
    assert recs[:25].shard_counts.tolist() == [10, 10, 5, 0]
    assert recs.fingerprint() == again.fingerprint()
    eager = records_from_spec(f"wds:{spec}", tmp_path / "cache")  # the list reader: the same records
    assert [(r.key, r.image, r.captions) for r in eager] == [(r.key, r.image, r.captions) for r in again]


def test_skipped_samples_are_counted_again_when_the_index_is_reused(tmp_path: Path) -> None:
    write_tar(tmp_path / "b-0.tar", {"a.jpg": jpeg(0), "a.txt": b"one", "b.txt": b"no image", "c.jpg": jpeg(1),
                                     "c.txt": b"three"})
    for _ in range(2):
        bad = BadSamples("skip")
        recs = open_shards(str(tmp_path / "b-0.tar"), tmp_path / "cache", bad)
        assert [r.key for r in recs] == ["a", "c"] and bad.count == 1 and "b-0.tar:b" in bad.skipped[0]
    with pytest.raises(DataError, match=r"b-0.tar:b: no image member"):
        open_shards(str(tmp_path / "b-0.tar"), tmp_path / "cache")  # raise: the stored index says so too


def test_duplicate_keys_across_shards_are_named_or_skipped(tmp_path: Path) -> None:
    write_tar(tmp_path / "a-0.tar", {"k1.jpg": jpeg(0), "k1.txt": b"one", "k2.jpg": jpeg(1), "k2.txt": b"two"})
    write_tar(tmp_path / "a-1.tar", {"k3.jpg": jpeg(2), "k3.txt": b"three", "k1.jpg": jpeg(3), "k1.txt": b"again"})
    spec = f"{tmp_path}/a-{{0..1}}.tar"
    with pytest.raises(DataError, match=r"a-1.tar:k1: duplicate sample key \(also in .*a-0.tar:k1\)"):
        open_shards(spec, tmp_path / "c1")
    bad = BadSamples("skip")
    assert [r.key for r in open_shards(spec, tmp_path / "c2", bad)] == ["k1", "k2", "k3"] and bad.count == 1


def test_a_changed_local_shard_is_reindexed(tmp_path: Path) -> None:
    spec = write_shards(tmp_path / "d", shards=2, per=4)
    assert len(open_shards(spec, tmp_path / "cache")) == 8
    time.sleep(0.01)
    write_tar(tmp_path / "d" / "s-0001.tar", {"x.jpg": jpeg(9), "x.txt": b"only one"})
    recs = open_shards(spec, tmp_path / "cache")
    assert len(recs) == 5 and recs[4].key == "x"


# ---------------------------------------------------------------------------------------------------- loaders


def test_batches_are_identical_for_0_1_and_2_workers_and_from_any_start(tmp_path: Path) -> None:
    recs = open_shards(write_shards(tmp_path / "d", shards=5, per=7), tmp_path / "cache")
    data = train_data(recs)
    steps = data.plan.per_epoch + 3  # into the second epoch
    ref = list(data.batches(0, steps, workers=0))
    assert len(ref) == steps and ref[0].pixel_values.shape == (6, 3, 16, 16)
    for workers in (1, 2):
        got = list(data.batches(0, steps, workers=workers))
        assert all(same(a, b) for a, b in zip(got, ref)), f"{workers} workers"
    assert all(same(a, b) for a, b in zip(data.batches(4, steps, workers=2), ref[4:]))  # a resume at step 4
    # ranks slice the global batch: 2 ranks' halves are the 1-rank batch
    two = train_data(recs, world=2)
    for step in (0, 5, steps - 1):
        halves = [two.batch(step, rank) for rank in (0, 1)]
        assert halves[0].keys + halves[1].keys == ref[step].keys
        assert torch.equal(torch.cat([h.pixel_values for h in halves]), ref[step].pixel_values)


def _rank_batches(rank: int, spec: str, cache: str, out: str, steps: int) -> None:
    """Inside a spawned process of a 2-process gloo group: this rank's batches through a 1-worker loader."""
    from test_distributed import _join_group

    _join_group(rank, 2, int(out.rsplit("-", 1)[1]))
    data = train_data(open_shards(spec, cache), world=2)
    batches = list(data.batches(0, steps, rank=rank, workers=1))
    torch.save({"pix": torch.stack([b.pixel_values for b in batches]), "keys": [b.keys for b in batches],
                "captions": [b.captions for b in batches]}, f"{out}-rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_see_the_one_process_batches(tmp_path: Path) -> None:
    from test_distributed import _free_port, _spawn

    spec = write_shards(tmp_path / "d", shards=3, per=8)
    recs = open_shards(spec, tmp_path / "cache")  # the index is built here; the processes reuse it
    steps = 6
    ref = list(train_data(recs).batches(0, steps))
    out = f"{tmp_path}/b-{_free_port()}"
    _spawn(_rank_batches, (spec, str(tmp_path / "cache"), out, steps))
    got = [torch.load(f"{out}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for step in range(steps):
        assert got[0]["keys"][step] + got[1]["keys"][step] == ref[step].keys
        assert got[0]["captions"][step] + got[1]["captions"][step] == ref[step].captions
        assert torch.equal(torch.cat([got[0]["pix"][step], got[1]["pix"][step]]), ref[step].pixel_values)


def test_an_undecodable_image_is_one_line_naming_shard_and_key_from_any_worker(tmp_path: Path) -> None:
    spec = write_shards(tmp_path / "d", shards=2, per=4)
    write_tar(tmp_path / "d" / "s-0002.tar", {"junk.jpg": b"not a jpeg at all", "junk.txt": b"broken"})
    data = train_data(open_shards(spec.replace("0001}", "0002}"), tmp_path / "cache"), batch=9)  # every sample
    for workers in (0, 1):
        with pytest.raises(DataError, match=r"s-0002.tar:junk: cannot read image") as e:
            list(data.batches(0, 1, workers=workers))
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


# ------------------------------------------------------------------------------------------------ remote specs


def _expected(spec: str, cache: Path) -> list[tuple[str, bytes, tuple[str, ...]]]:
    return [(r.key, r.image, r.captions) for r in open_shards(spec, cache)]


def test_pipe_and_file_url_shards_stream_through_a_bounded_cache(tmp_path: Path) -> None:
    write_shards(tmp_path / "d", shards=3, per=4)
    want = _expected(f"{tmp_path}/d/s-{{0000..0002}}.tar", tmp_path / "c0")
    piped = open_shards(f"pipe:cat {tmp_path}/d/s-{{0000..0002}}.tar", tmp_path / "c1", max_cached=1)
    assert [(r.key, r.image, r.captions) for r in piped] == want
    assert len(list((tmp_path / "c1" / "shards" / "fetched").glob("*.tar"))) <= 1  # never all shards on disk
    url = open_shards(f"file://{tmp_path}/d/s-{{0000..0002}}.tar", tmp_path / "c2", max_cached=2)
    assert [(r.key, r.image, r.captions) for r in url] == want
    assert len(list((tmp_path / "c2" / "shards" / "fetched").glob("*.tar"))) <= 2


@pytest.fixture
def http_server(tmp_path: Path):  # noqa: ANN201
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"cannot bind a local port for an HTTP server ({e})")
    root = tmp_path / "www"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip("the local HTTP server did not start")
            time.sleep(0.05)
    yield root, f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def test_http_url_shards(http_server: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_server
    write_shards(root, shards=2, per=3)
    want = _expected(f"{root}/s-{{0000..0001}}.tar", tmp_path / "c0")
    got = open_shards(f"{base}/s-{{0000..0001}}.tar", tmp_path / "c1", max_cached=1)
    assert [(r.key, r.image, r.captions) for r in got] == want
    with pytest.raises(DataError, match=r"shard http://127.0.0.1:\d+/missing.tar: cannot fetch it") as e:
        open_shards(f"{base}/missing.tar", tmp_path / "c2")
    assert "\n" not in str(e.value)


class _LyingServer:
    """A loopback HTTP server that declares each file's whole length but sends only half of the body for the first
    ``cut`` requests of each path, then closes the connection (a download cut off mid-way)."""

    def __init__(self, root: Path, cut: int) -> None:
        import http.server
        import threading

        served: dict[str, int] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                served[self.path] = served.get(self.path, 0) + 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if served[self.path] > cut else data[:len(data) // 2])
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        except OSError as e:
            pytest.skip(f"cannot bind a local port for an HTTP server ({e})")
        self.served = served
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_download_cut_off_mid_way_is_fetched_again_and_never_kept_as_whole(tmp_path: Path) -> None:
    """Issue 19 item 8: the body is checked against Content-Length before the copy is renamed into place."""
    root = tmp_path / "www"
    write_shards(root, shards=2, per=3)
    want = _expected(f"{root}/s-{{0000..0001}}.tar", tmp_path / "c0")
    server = _LyingServer(root, cut=1)  # each shard's first download is cut off, the second is whole
    try:
        got = open_shards(f"{server.base}/s-{{0000..0001}}.tar", tmp_path / "c1")
        assert [(r.key, r.image, r.captions) for r in got] == want
        assert server.served == {"/s-0000.tar": 2, "/s-0001.tar": 2}
        fetched = tmp_path / "c1" / "shards" / "fetched"
        assert sorted(p.stat().st_size for p in fetched.glob("*.tar")) == sorted(
            p.stat().st_size for p in root.glob("*.tar"))
    finally:
        server.close()
    server = _LyingServer(root, cut=99)  # always cut off: one line, bounded tries, nothing kept
    try:
        with pytest.raises(DataError, match=r"shard http://127\.0\.0\.1:\d+/s-0000\.tar: the download was cut short "
                                            r"\(\d+ of \d+ bytes received\); fetched 3 times") as e:
            open_shards(f"{server.base}/s-0000.tar", tmp_path / "c2")
        assert "\n" not in str(e.value) and server.served == {"/s-0000.tar": 3}
        assert [p.name for p in (tmp_path / "c2" / "shards" / "fetched").iterdir() if not p.name.endswith(".lock")] \
            == []
    finally:
        server.close()


def test_a_refetched_shard_must_be_the_one_indexed(tmp_path: Path) -> None:
    """Once indexed, a shard fetched again (evicted, or in a new process) is checked against the indexed SHA-256:
    a copy with other bytes (the remote file replaced, or damaged in transit) is never read as the indexed one."""
    src = tmp_path / "remote"
    write_shards(src, shards=2, per=3)
    spec = f"file://{src}/s-{{0000..0001}}.tar"
    records = open_shards(spec, tmp_path / "c", max_cached=1)  # shard 0 is evicted by shard 1's fetch
    write_shards(src, shards=1, per=3, prefix="t")  # shard 0 replaced remotely (other keys, other bytes)
    (src / "t-0000.tar").replace(src / "s-0000.tar")
    with pytest.raises(DataError, match=r"s-0000\.tar: the fetched copy's SHA-256 .* is not the .* its index "
                                        r"recorded; fetched 3 times") as e:
        records[0]
    assert "\n" not in str(e.value)


def test_bad_remote_shards_are_one_line_naming_the_shard(tmp_path: Path) -> None:
    cases = {
        "pipe:exit 3": r"shard pipe:exit 3: the command exited with status 3",
        f"file://{tmp_path}/none.tar": r"shard file://.*/none.tar: cannot fetch it \(FileNotFoundError",
        "pipe:echo not a tar": r"shard pipe:echo not a tar|pipe:echo not a tar: cannot read tar shard",
        "nosuchscheme://x/y.tar": r"shard nosuchscheme://x/y.tar: cannot fetch it",
    }
    for spec, pattern in cases.items():
        with pytest.raises(DataError, match=pattern) as e:
            open_shards(spec, tmp_path / "cache")
        assert "\n" not in str(e.value), spec
    (tmp_path / "z.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"z.tar.gz: not a readable gzip stream"):
        open_shards(str(tmp_path / "z.tar.gz"), tmp_path / "cache")


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("keep_threads")
def test_distill_on_shards_with_an_online_teacher_counts_skipped_samples(tiny_teacher_dir: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Without augmentation over streamed shards the teacher runs per batch (no table over every sample), the
    data fingerprint comes from the index, and ``on_error: skip`` counts the sample the index left out."""
    import json

    import yaml
    from tiny_runs import student

    from mmkd.cli import main

    spec = write_shards(tmp_path / "d", shards=2, per=6)
    write_tar(tmp_path / "d" / "s-0002.tar", {"bad.txt": b"no image here", "ok.jpg": jpeg(5), "ok.txt": b"fine"})
    cfg = {"teacher": str(tiny_teacher_dir), "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
           "student": student("new"),
           "data": {"train": f"wds:{spec[:-len('{0000..0001}.tar')]}{{0000..0002}}.tar", "batch_size": 4,
                    "on_error": "skip", "workers": 1},
           "objectives": [{"name": "clip"}, {"name": "fd_mse"}],
           "train": {"steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "threads": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", str(tmp_path / "run.yaml")]) == 0
    assert "computing teacher targets once" not in capsys.readouterr().out  # per batch, beside the student's
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"] == {"on_error": "skip", "skipped": 1}
    prints = metrics["run"]["fingerprints"]["data"]["paired"]
    assert prints["n"] == 13 and prints["shards"] == 3


# ------------------------------------------------------------------------------------------------ a real kill


@pytest.mark.slow
def test_sigkill_mid_epoch_on_shards_then_resume_sees_the_uninterrupted_batches(tiny_teacher_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """A real ``mmkd distill`` over 4 shards (one DataLoader worker) is SIGKILLed between checkpoints in its first
    epoch; ``--resume`` restarts the loader at the checkpoint's step and ends with the uninterrupted run's weights
    and losses, step for step."""
    import yaml
    from tiny_runs import assert_same_weights, kill_when, losses, mmkd_ok, start, student

    spec = write_shards(tmp_path / "d", shards=4, per=10)

    def config(out: Path) -> Path:
        cfg = {"teacher": str(tiny_teacher_dir), "out": str(out), "cache_dir": str(tmp_path / "cache"),
               "student": student("new"),
               "data": {"train": f"wds:{spec}", "batch_size": 4, "augment": True, "views": 2, "workers": 1,
                        "shard_window": 2},
               "objectives": [{"name": "clip"}, {"name": "fd_mse"}],
               "train": {"steps": 16, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 4,
                         "threads": 1}}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    mmkd_ok("distill", str(config(tmp_path / "ref")))
    out = tmp_path / "killed"

    def logged() -> int:
        try:
            return max((len(line) > 0) * i for i, line in enumerate((out / "metrics.jsonl").read_text().splitlines(),
                                                                      1))
        except (FileNotFoundError, ValueError):
            return 0

    proc = start("distill", str(config(out)), log=tmp_path / "log.txt")
    kill_when(proc, lambda: logged() >= 6, "step 6", poll_s=0.01)  # mid-epoch (10 steps an epoch), past step 4
    assert not (out / "student").exists()
    mmkd_ok("distill", str(config(out)), "--resume")
    assert_same_weights(out / "student", tmp_path / "ref" / "student")
    assert losses(out) == losses(tmp_path / "ref")


def test_workers_send_uint8_pixels_normalised_in_the_training_process(tmp_path: Path) -> None:
    """A worker's item is the raw batch (uint8: a quarter of float32's bytes between processes); the batch the
    loader yields is its normalisation, equal to `TrainData.batch`'s floats."""
    from mmkd.data.loader import StepDataset

    data = train_data(open_shards(write_shards(tmp_path / "d", shards=2, per=6), tmp_path / "cache"))
    raw = StepDataset(data, 0)[1]
    assert isinstance(raw, TrainBatch) and raw.pixel_values.dtype == torch.uint8
    assert raw.pixel_values.is_contiguous() and raw.pixel_values.shape == (6, 3, 16, 16)
    (got,) = list(data.batches(1, 2, workers=1))
    assert got.pixel_values.dtype == torch.float32
    assert torch.equal(got.pixel_values, data.batch(1).pixel_values)
    assert torch.equal(got.pixel_values, data.paired.pixels_of([data.paired.records[int(i)] for i in raw.paired_idx],
                                                               raw.views))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_loader_worker_dies_with_a_sigkilled_training_process() -> None:
    """A forked worker shares the run folder's lock (a flock belongs to the open file): it must not outlive a
    SIGKILLed training process, or a ``--resume`` started at once finds the folder locked (DataLoader's own
    watchdog notices a dead parent only seconds later)."""
    script = ("import os, time\nfrom mmkd.data.loader import _die_with\nparent = os.getpid()\npid = os.fork()\n"
              "if pid == 0:\n    _die_with(parent)\n    time.sleep(300)\n    os._exit(0)\n"
              "print(pid, flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait()

    def alive() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 60  # without the death signal the worker sleeps 300 s
    while alive():
        assert time.monotonic() < deadline, "the worker outlived its training process"
        time.sleep(0.05)


def test_a_frozen_text_tower_computed_per_step_matches_its_table(minilm_path: str) -> None:
    """Over streamed shards a frozen text tower's caption features are computed per step, not tabled; in train
    mode its dropout would make them differ from the table in-memory data uses (and from step to step)."""
    from conftest import tiny_dual_encoder

    from mmkd.objectives.base import WeightedSum
    from mmkd.train.task import DistillTask, FrozenText, text_is_frozen, train_mode

    student = tiny_dual_encoder(minilm_path, dropout=True)
    for p in student.text_model.parameters():
        p.requires_grad_(False)
    captions = ["a red circle at the top", "a blue square in the middle"]
    table = FrozenText(student, captions).lookup(captions)
    task = DistillTask(student, WeightedSum([]))
    train_mode(task, text_is_frozen(student))
    assert student.training and not student.text_model.training
    tok = student.tokenize(captions)
    with torch.no_grad():
        per_step = [student.text_features(tok["input_ids"], tok["attention_mask"]) for _ in range(2)]
    assert torch.equal(per_step[0], per_step[1])  # no dropout
    # the table may be computed in bf16 (where the CPU is fast at it): equal up to its rounding
    assert torch.nn.functional.cosine_similarity(per_step[0], table).min() > 0.999
