"""The ``mmkd`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

DATA_SPECS = """data specs are FORMAT:PATH:
  world:SPLIT                      the built-in world (train, val, test, pool)
  jsonl:FILE                       one {"image": path, "captions": [...]} per line
  csv:FILE / tsv:FILE              columns filepath, title (open_clip's defaults)
  coco:FILE                        COCO captions JSON (images/ beside it)
  imagefolder:DIR                  DIR/<class>/*.jpg
  wds:SHARDS                       WebDataset tars (brace ranges allowed), .cls + classes.txt or .txt captions
  cifar10:DIR_OR_SHARDS  cifar100:DIR  stl10:DIR   their own on-disk formats (split: test)"""


def _print_table(metrics: dict[str, Any]) -> None:
    from mmkd.report.demo_report import markdown_table, table_rows

    print(markdown_table(table_rows(metrics)))


def cmd_demo(args: argparse.Namespace) -> int:
    from mmkd.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, cache_dir=args.cache)
    print()
    _print_table(metrics)
    print(f"\nmetrics: {os.path.join(args.out, 'metrics.json')}   report: {os.path.join(args.out, 'report.md')}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from mmkd.config import load_config
    from mmkd.distill import run_distill

    cfg = load_config(args.config, args.overrides)
    metrics = run_distill(cfg, resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mmkd.data.resolve import records_from_spec, zeroshot_classes
    from mmkd.eval.suite import retrieval, world_labels, zeroshot
    from mmkd.models.hub import load_dual_encoder

    model = load_dual_encoder(args.model)
    options = {"split": args.split} if args.split and not args.data.startswith(("world:", "jsonl:", "coco:",
                                                                                 "csv:", "tsv:", "wds:",
                                                                                 "imagefolder:")) else {}
    records = records_from_spec(args.data, args.cache, world_n=args.world_n, **options)
    if args.limit:
        records = records[: args.limit]
    if args.task == "zeroshot":
        names, templates = zeroshot_classes(args.data, args.class_set)
        labels = world_labels(records, args.class_set or "colour_shape") if args.data.startswith("world:") else None
        result = zeroshot(model, records, names, templates, labels)
    else:
        result = retrieval(model, records)
    print(json.dumps({"model": args.model, "data": args.data, args.task: result}, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from mmkd.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config, args.grid, args.overrides, out=args.out)
    print(f"sweep: {len(sweep.runs)} runs → {sweep.out}")
    board = run_sweep(sweep)
    if int(os.environ.get("RANK", 0)) == 0:
        print()
        print(board.read_text())
        print(f"leaderboard: {board}  {board.with_suffix('.csv')}  {board.with_suffix('.png')}")
    return 0


def cmd_objectives(args: argparse.Namespace) -> int:
    from mmkd.objectives import OBJECTIVES
    from mmkd.objectives.base import objective_params

    for name in OBJECTIVES.names():
        params = objective_params(OBJECTIVES.get(name))
        print(" ".join([name, *(f"{k}={v!r}" for k, v in params.items())]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkd", description="Multimodal knowledge distillation for CLIP-style models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a teacher on the built-in world, distil it, compare with scratch")
    d.add_argument("--quick", action="store_true", help="tiny models and budgets (about a minute)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--cache", default=None, help="cache folder for world data and the teacher (default OUT/cache)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("distill", help="distil a teacher into a student from a YAML config")
    s.add_argument("config", help="YAML run config (see configs/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    s.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    s.set_defaults(func=cmd_distill)

    w = sub.add_parser("sweep", help="run a grid of distillation runs and write a leaderboard",
                       description="Run every point of the config's sweep.grid (plus --grid axes), skip finished "
                                   "runs, and write leaderboard.md/.csv/.png with the teacher and from-scratch "
                                   "references. Under torchrun each process takes every N-th run.")
    w.add_argument("config", help="YAML run config with a sweep section (see configs/s1_compare.yaml)")
    w.add_argument("overrides", nargs="*", help="key=value overrides applied to every run, e.g. train.steps=50")
    w.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis: an objective-set axis (values name sweep.sets) or a config key; repeatable")
    w.add_argument("--out", default=None, help="output folder (default: the config's sweep.out)")
    w.set_defaults(func=cmd_sweep)

    o = sub.add_parser("objectives", help="list every registered objective with its parameters and defaults")
    o.set_defaults(func=cmd_objectives)

    e = sub.add_parser("eval", help="evaluate a model", epilog=DATA_SPECS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("task", choices=["zeroshot", "retrieval"])
    e.add_argument("--model", required=True, help="model folder or hub id")
    e.add_argument("--data", required=True, help="data spec FORMAT:PATH (see below)")
    e.add_argument("--class-set", default=None, help="built-in world class set: colour_shape, shape, colour")
    e.add_argument("--split", default="test", help="split for cifar10/cifar100/stl10 (default test)")
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    e.add_argument("--cache", default="runs/.cache", help="cache folder for the built-in world")
    e.add_argument("--world-n", type=int, default=2000, help="images in a built-in world split")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse gives a nargs='*' positional only one chance)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from mmkd.config import ConfigError
    from mmkd.data.records import DataError
    from mmkd.models.hub import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, ModelLoadError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mmkd: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
