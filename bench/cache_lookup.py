"""What the teacher cache's key lookup costs at a million keys: format 1's dict against format 2's memory-mapped
hash index, each in its own fresh process.

Setup (once, in a temporary folder): N sample keys (WebDataset-style, ``000123456``) in segments of ``--per-shard``
keys, written by the cache's own code (``folder.prepare_segment`` per segment, then ``folder.publish``: the manifest
and the merged index; its time is ``index_build_s``), plus format 1's ``keys.json`` (keys and content digests).

Variants, each in a fresh process after importing numpy:
- ``dict`` (format 1, how every process opened a cache): ``json.loads(keys.json)`` and ``{key: row}``;
- ``index`` (format 2): ``KeyIndex`` over the manifest's generation: four memory maps, searched with
  ``np.searchsorted`` and checked against the stored key bytes.
Figures: time to open (to the first lookup's readiness), lookups/s over ``--lookups`` random keys in batches of
``--batch`` (a training batch's keys), and memory above the process's baseline after those lookups: RSS (which
counts the index's file pages the lookups touched: page cache, shared by every process that maps the same file)
and its anonymous part (the process's own heap).

Usage: python bench/cache_lookup.py [--keys 1000000] [--per-shard 10000] [--lookups 200000] [--batch 256]
                                    [--work DIR] [--json PATH]
Prints each variant's figures, then the headline figures as the last lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procstat import status_kb  # bench/: sys.path[0] when a benchmark runs as a script

SRC = str(Path(__file__).resolve().parents[1] / "src")




def _keys(n: int) -> list[str]:
    return [f"{i:09d}" for i in range(n)]


def setup(work: Path, n: int, per_shard: int) -> dict[str, Any]:
    """Write both formats' key lookup files for ``n`` keys; return where they are and the index build time."""
    sys.path.insert(0, SRC)
    from mmkd.teacher.cache.folder import prepare_segment, publish, segment_meta
    from mmkd.teacher.cache.format import DONE_FILE, SEGMENTS, read_manifest, segment_name, write_json

    keys = _keys(n)
    digests = [f"bytes:{i:024x}" for i in range(n)]  # as long as a tar member's digest
    (work / "v1").mkdir(parents=True, exist_ok=True)
    (work / "v1" / "keys.json").write_text(json.dumps({"keys": keys, "digests": digests}, indent=1))
    root = work / "v2"
    names = []
    t0 = time.perf_counter()
    for s, lo in enumerate(range(0, n, per_shard)):
        shard = f"/data/cc-{s:05d}.tar"
        folder = root / SEGMENTS / segment_name(shard)
        k, d = keys[lo:lo + per_shard], digests[lo:lo + per_shard]
        prepare_segment(folder, segment_meta(shard, k, d, []), k, d, [])
        write_json(folder / DONE_FILE, {"shard": shard, "chunks": 0})
        names.append(folder.name)
    segments_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    publish(root, names)
    index_s = time.perf_counter() - t0
    manifest = read_manifest(root)
    assert manifest is not None
    return {"v1": str(work / "v1" / "keys.json"), "v2": str(root), "generation": manifest["index"],
            "segments_write_s": segments_s, "index_build_s": index_s}


def child(variant: str, where: dict[str, Any], n: int, lookups: int, batch: int) -> dict[str, Any]:
    """One variant in this (fresh) process: open, look up, measure."""
    import numpy as np

    sys.path.insert(0, SRC)
    from mmkd.teacher.cache.index import KeyIndex

    rng = np.random.default_rng(0)
    queries = [f"{i:09d}" for i in rng.integers(0, n, lookups)]
    base_rss, base_anon = status_kb("VmRSS"), status_kb("RssAnon")
    t0 = time.perf_counter()
    if variant == "dict":
        index = json.loads(Path(where["v1"]).read_text())
        row = {k: i for i, k in enumerate(index["keys"])}
        digests = index["digests"]  # format 1 kept them too: the check of changed samples reads them by row

        def look(keys: list[str]) -> np.ndarray:
            return np.fromiter((row[k] for k in keys), dtype=np.int64, count=len(keys))
    else:
        ki = KeyIndex(Path(where["v2"]), where["generation"], "keys")
        ki.maps()
        digests = None

        def look(keys: list[str]) -> np.ndarray:
            return ki.rows(keys)
    open_s = time.perf_counter() - t0
    got = []
    t0 = time.perf_counter()
    for lo in range(0, lookups, batch):
        got.append(look(queries[lo:lo + batch]))
    lookup_s = time.perf_counter() - t0
    rows = np.concatenate(got)
    assert np.array_equal(rows, np.array([int(q) for q in queries])), "wrong rows"
    del digests
    return {"variant": variant, "open_s": open_s, "lookups_per_s": lookups / lookup_s,
            "rss_mb": (status_kb("VmRSS") - base_rss) / 1024, "anon_mb": (status_kb("RssAnon") - base_anon) / 1024}


def run_child(variant: str, where: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--where", json.dumps(where),
                          "--keys", str(args.keys), "--lookups", str(args.lookups), "--batch", str(args.batch)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the {variant} process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--lookups", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--work", default=None, help="folder for the generated files (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--where", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.where), args.keys, args.lookups, args.batch)))
        return
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        where = setup(Path(tmp), args.keys, args.per_shard)
        results = {v: run_child(v, where, args) for v in ("dict", "index")}
    for v, r in results.items():
        print(f"{v:6s} open {r['open_s']:.3f} s, {r['lookups_per_s']:,.0f} lookups/s, RSS +{r['rss_mb']:.1f} MB "
              f"(anonymous +{r['anon_mb']:.1f} MB)")
    d, i = results["dict"], results["index"]
    figures = {"keys": args.keys, "per_shard": args.per_shard, "segments": -(-args.keys // args.per_shard),
               "lookups": args.lookups, "batch": args.batch, "index_build_s": round(where["index_build_s"], 3),
               "variants": results, "cache_lookup_rss_mb_1m": round(i["rss_mb"], 1),
               "dict_lookup_rss_mb_1m": round(d["rss_mb"], 1), "open_s_index": round(i["open_s"], 4),
               "open_s_dict": round(d["open_s"], 3),
               "dict_over_index_rss": round(d["rss_mb"] / max(i["rss_mb"], 0.1), 1)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"index build (merging {figures['segments']} segments' hashes and keys): {figures['index_build_s']:.2f} s")
    print(f"open: dict {d['open_s']:.3f} s, index {i['open_s'] * 1000:.2f} ms")
    print(f"lookups/s: dict {d['lookups_per_s']:,.0f}, index {i['lookups_per_s']:,.0f}")
    print(f"cache_lookup_rss_mb_1m: {figures['cache_lookup_rss_mb_1m']} (dict: {figures['dict_lookup_rss_mb_1m']})")


if __name__ == "__main__":
    main()
