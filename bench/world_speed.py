"""Measure how fast the built-in world generates images (single process; numpy ops are single-threaded).

Usage: python bench/world_speed.py [--n 20000] [--image-size 32] [--repeats 3] [--json PATH]
Prints per-repeat timings, then images/s (best of the repeats) on the last line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmkd.data.world import WorldConfig, generate


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="images per repeat")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write {'images_per_s': ...} here")
    args = ap.parse_args(argv)

    cfg = WorldConfig(image_size=args.image_size)
    generate(256, seed=123, config=cfg)  # warm-up (imports, allocator)
    best = float("inf")
    for r in range(args.repeats):
        t0 = time.perf_counter()
        generate(args.n, seed=r, config=cfg)
        dt = time.perf_counter() - t0
        best = min(best, dt)
        print(f"repeat {r}: {args.n} images of {args.image_size}px in {dt:.3f}s")
    rate = args.n / best
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images_per_s": rate, "n": args.n, "image_size": args.image_size}))
    print(f"images/s: {rate:.0f}")
    return rate


if __name__ == "__main__":
    main()
