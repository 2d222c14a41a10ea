"""``mmkd demo``: train a teacher on the built-in world, distil it, compare with scratch."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="train a teacher on the built-in world, distil it, compare with scratch")
    d.add_argument("--quick", action="store_true", help="tiny models and budgets (about a minute)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--cache", default=None, help="cache folder for world data and the teacher (default OUT/cache)")
    d.add_argument("--configs", default="configs/demo",
                   help="folder of the demo's run configs (default configs/demo, from the repository root)")
    d.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="the whole demo N times (train.seed offset 0..N-1, teacher included) and the figures as "
                        "mean ± sd in OUT/seeds.json (default OUT: runs/demo-seeds)")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmkd.demo import run_demo, run_demo_seeds
    from mmkd.report.demo_report import markdown_table, seeds_table, table_rows

    if args.seeds is not None:
        out = args.out if args.out != "runs/demo" else "runs/demo-seeds"
        result = run_demo_seeds(args.seeds, out, quick=args.quick, cache_dir=args.cache, config_dir=args.configs)
        print()
        print(seeds_table(result))
        print(f"\nper-seed figures and the summary: {os.path.join(out, 'seeds.json')}")
        return 0

    metrics = run_demo(args.out, quick=args.quick, cache_dir=args.cache, config_dir=args.configs)
    print()
    print(markdown_table(table_rows(metrics)))
    print("\ntime per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in metrics["demo"]["phases_s"].items())
          + f"; total {metrics['demo']['seconds'] / 60:.1f} min")
    print(f"\nmetrics: {os.path.join(args.out, 'metrics.json')}   report: {os.path.join(args.out, 'report.html')} "
          f"(and report.md)")
    return 0
