"""``mmkd sweep CONFIG [--grid KEY=V1,V2 ...] [--seeds N] [--out DIR] [key=value ...]``: a grid of runs and a
leaderboard."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(sub: Any) -> None:
    w = sub.add_parser("sweep", help="run a grid of distillation runs and write a leaderboard",
                       description="Run every point of the config's sweep.grid (plus --grid axes), skip finished "
                                   "runs, and write leaderboard.md/.csv/.png with the teacher and from-scratch "
                                   "references. Under torchrun each process takes every N-th run.")
    w.add_argument("config", help="YAML run config with a sweep section (see configs/s1_compare.yaml)")
    w.add_argument("overrides", nargs="*", help="key=value overrides applied to every run, e.g. train.steps=50")
    w.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis: an objective-set axis (values name sweep.sets) or a config key; repeatable")
    w.add_argument("--out", default=None, help="output folder (default: the config's sweep.out)")
    w.add_argument("--seeds", default=None, metavar="N|S1,S2,…",
                   help="run every grid point with N seeds (train.seed, +1, …) or with the listed seeds; the "
                        "leaderboard then shows mean ± sd over seeds (replaces sweep.seeds)")
    w.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmkd.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config, args.grid, args.overrides, out=args.out, seeds=args.seeds)
    print(f"sweep: {len(sweep.runs)} runs → {sweep.out}")
    board = run_sweep(sweep)
    if int(os.environ.get("RANK", 0)) == 0:
        print()
        print(board.read_text())
        print(f"leaderboard: {board}  {board.with_suffix('.csv')}  {board.with_suffix('.png')}")
    return 0
