"""Does the training data plane's memory grow with the dataset? Synthetic WebDataset shards at N = 20,000, 100,000
and 400,000 samples, each N measured in fresh processes.

Data: 1,000 samples per shard, each a small JPEG (one of 16 encoded once, so writing is fast) with a unique key
and caption; the N sets are prefixes of one folder of 400 shards (``s-{0000..0019}.tar`` is N = 20,000), written
once into ``--work`` (default: a temporary folder, removed at the end).

Per N: (1) a fresh process builds the shard index (``index_build_s``: one pass over every shard, reported apart);
(2) a fresh process opens the data as ``mmkd distill`` does (`records_from_spec(stream=True)` + ``ImageBank`` +
``TrainData``) and draws 100 training batches through the DataLoader (``--workers``, default 0: the whole data plane
in the measured process): ``first_batch_s`` (from opening the data to the first batch, the index already built),
``steps_per_s``, and the peak RSS (``VmHWM``) of that process, raw and above its baseline after imports; with
workers > 0 the workers' peak (``ru_maxrss`` of the children) is reported too.

Keys: ``rss_400k_over_20k`` (raw peak RSS ratio; target ≤ 1.15), ``rss_delta_400k_over_20k`` (above baseline),
``first_batch_s_400k`` (target ≤ 10 s). ``cache_lookup_rss_mb_1m`` is measured by ``bench/cache_lookup.py`` (the
teacher cache's key lookup at 1,000,000 keys): copied from its JSON (``--cache-lookup-json``, default
``bench/results/cache_lookup.json``), or measured by running it when that file is absent.

Usage: python bench/data_scale.py [--sizes 20000,100000,400000] [--steps 100] [--batch 128] [--image-size 64]
                                  [--workers 0] [--work DIR] [--cache-lookup-json PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from procstat import status_kb  # bench/: sys.path[0] when a benchmark runs as a script

PER_SHARD = 1000
CACHE_LOOKUP_KEY = "cache_lookup_rss_mb_1m"  # measured by bench/cache_lookup.py (the teacher cache's key lookup)
LOOKUP_JSON = Path(__file__).resolve().parent / "results" / "cache_lookup.json"




def _jpegs(n: int = 16, size: int = 48) -> list[bytes]:
    import numpy as np
    from PIL import Image

    out = []
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.stack([(x * (i + 3)) % 256, (y * (i + 5)) % 256, ((x + y) * 7 + 40 * i) % 256], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_shards(folder: Path, n: int) -> None:
    """``n`` samples as shards of PER_SHARD; shards already written (complete, renamed into place) are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    images = _jpegs()
    for s in range(-(-n // PER_SHARD)):
        path = folder / f"s-{s:04d}.tar"
        if path.is_file():
            continue
        tmp = path.with_suffix(".part")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(PER_SHARD):
                key = f"{s:04d}{j:04d}"
                for ext, data in (("jpg", images[(s * 7 + j) % len(images)]),
                                  ("txt", f"a synthetic photo number {s * PER_SHARD + j}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        tmp.replace(path)


def spec(folder: Path, n: int) -> str:
    return f"wds:{folder}/s-{{0000..{n // PER_SHARD - 1:04d}}}.tar"


# ------------------------------------------------------------------------------------------ child processes


def child_index(args: argparse.Namespace) -> dict[str, Any]:
    from mmkd.data.resolve import records_from_spec

    t0 = time.perf_counter()
    recs = records_from_spec(spec(args.work, args.n), args.work / "cache", stream=True)
    return {"index_build_s": round(time.perf_counter() - t0, 2), "n": len(recs),
            "index_reported_build_s": round(recs.index.build_s, 2)}


def child_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mmkd.data.batches import ImageBank, TrainData
    from mmkd.data.resolve import records_from_spec

    torch.set_num_threads(1)
    base_kb = status_kb("VmRSS")
    t0 = time.perf_counter()
    recs = records_from_spec(spec(args.work, args.n), args.work / "cache", stream=True)
    bank = ImageBank(recs, args.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True, seed=0)
    data = TrainData(bank, None, args.batch, 0, world=1, seed=0, views=2)
    it = data.batches(0, args.steps, workers=args.workers)
    first = next(it)
    first_s = time.perf_counter() - t0
    assert first.pixel_values.shape[0] == args.batch
    t1 = time.perf_counter()
    done = 1
    for _ in it:
        done += 1
    rate = (done - 1) / max(1e-9, time.perf_counter() - t1)
    del it
    peak_kb = status_kb("VmHWM")
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"n": len(recs), "steps": done, "first_batch_s": round(first_s, 3), "steps_per_s": round(rate, 2),
            "peak_rss_mb": round(peak_kb / 1024, 1), "baseline_rss_mb": round(base_kb / 1024, 1),
            "peak_above_baseline_mb": round((peak_kb - base_kb) / 1024, 1),
            "worker_peak_rss_mb": round(children_kb / 1024, 1) if args.workers else None}


def _child(mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--work", str(args.work), "--steps",
           str(args.steps), "--batch", str(args.batch), "--image-size", str(args.image_size), "--workers",
           str(args.workers)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {mode} N={n} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,100000,400000")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--cache-lookup-json", type=Path, default=LOOKUP_JSON,
                    help=f"bench/cache_lookup.py's JSON, whose {CACHE_LOOKUP_KEY} is copied into this one (absent: "
                         "bench/cache_lookup.py is run)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=("index", "run"), default=None)
    ap.add_argument("--n", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_index(args) if args.child == "index" else child_run(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmkd-data-scale-")
        args.work = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        write_shards(args.work / "shards", max(sizes))
        print(f"shards: {max(sizes)} samples in {max(sizes) // PER_SHARD} shards under {args.work} "
              f"({time.perf_counter() - t0:.1f} s to write)")
        results: dict[str, Any] = {"settings": {"sizes": sizes, "steps": args.steps, "batch": args.batch,
                                                "image_size": args.image_size, "workers": args.workers,
                                                "per_shard": PER_SHARD, "cpus": os.cpu_count()}}
        for n in sizes:
            row = {**_child("index", n, _with(args, "shards")), **_child("run", n, _with(args, "shards"))}
            results[str(n)] = row
            print(f"N={n:>7}: index {row['index_build_s']:.1f} s, first batch {row['first_batch_s']:.2f} s, "
                  f"{row['steps_per_s']:.2f} steps/s, peak RSS {row['peak_rss_mb']:.0f} MB "
                  f"({row['peak_above_baseline_mb']:.0f} MB above the {row['baseline_rss_mb']:.0f} MB baseline)")
        lo, hi = results[str(min(sizes))], results[str(max(sizes))]
        results["rss_400k_over_20k"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
        results["rss_delta_400k_over_20k"] = round(hi["peak_above_baseline_mb"] / lo["peak_above_baseline_mb"], 3)
        results["first_batch_s_400k"] = hi["first_batch_s"]
        results["index_build_s_400k"] = hi["index_build_s"]
        results[CACHE_LOOKUP_KEY], results["cache_lookup_from"] = cache_lookup_rss(args.cache_lookup_json, args.work)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        for key in ("rss_400k_over_20k", "rss_delta_400k_over_20k", "first_batch_s_400k", "index_build_s_400k",
                    CACHE_LOOKUP_KEY):
            print(f"{key} = {results[key]}")
    finally:
        if tmp is not None:
            tmp.cleanup()


def cache_lookup_rss(path: Path, work: Path) -> tuple[float | None, str]:
    """``cache_lookup_rss_mb_1m`` and where it came from: ``path`` (bench/cache_lookup.py's JSON) when it holds
    it, else a run of bench/cache_lookup.py (a minute or so) writing its JSON under ``work``."""
    if path.is_file():
        value = json.loads(path.read_text()).get(CACHE_LOOKUP_KEY)
        if value is not None:
            return value, str(path)
    out = work / "cache_lookup.json"
    print(f"{path} absent: measuring the cache lookup with bench/cache_lookup.py")
    subprocess.run([sys.executable, str(Path(__file__).with_name("cache_lookup.py")), "--json", str(out)],
                   check=True)
    return json.loads(out.read_text()).get(CACHE_LOOKUP_KEY), "bench/cache_lookup.py, run by this benchmark"


def _with(args: argparse.Namespace, sub: str) -> argparse.Namespace:
    """The children's view: shards under WORK/sub, the index cache under WORK/sub/cache."""
    out = argparse.Namespace(**vars(args))
    out.work = args.work / sub
    return out


if __name__ == "__main__":
    main()
