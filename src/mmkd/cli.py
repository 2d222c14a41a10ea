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

    overrides = list(args.overrides) + (["train.ignore_cache_fingerprint=true"] if args.ignore_fingerprint else [])
    cfg = load_config(args.config, overrides)
    metrics = run_distill(cfg, resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    if args.verify:
        if args.teacher or args.data or args.config:
            raise ValueError("--verify DIR checks an existing cache; it takes no --teacher/--data/--config")
        from mmkd.teacher.cache import verify_cache

        report = verify_cache(args.verify, deep=not args.quick)
        for note in report.notes:
            print(f"note: {note}")
        for problem in report.problems:
            print(f"problem: {problem}", file=sys.stderr)
        print(f"{'OK' if report.ok else 'DAMAGED'}: {report.root}" + (f": {report.summary}" if report.summary else ""))
        return 0 if report.ok else 1
    from mmkd.cache_command import run_cache

    run_cache(args)
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
    s.add_argument("--ignore-fingerprint", action="store_true",
                   help="with teacher: cache:DIR, use a cache built for other data or transforms (at your risk)")
    s.set_defaults(func=cmd_distill)

    c = sub.add_parser("cache", help="run the teacher once over the data and store its embeddings (or --verify)",
                       epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--teacher", help="model folder or hub id of the teacher")
    c.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="data spec FORMAT:PATH (repeat for several sets, e.g. captioned + uncaptioned images)")
    c.add_argument("--config", help="take the data (train and unpaired specs, limits, world sizes) from a distill "
                                    "config; --out defaults to its teacher: cache:DIR")
    c.add_argument("--out", help="cache folder (resumed if it holds a partial cache of the same build)")
    c.add_argument("--views", type=int, default=1, help="views per image: view 0 = eval transform, 1..K-1 "
                                                        "augmented (default 1)")
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="storage type (default float16)")
    c.add_argument("--features", action="store_true",
                   help="also store pooled pre-projection features (for objectives with level: features)")
    c.add_argument("--seed", type=int, default=0, help="view seed: view v of sample k is f(seed, k, v)")
    c.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="teacher compute precision (auto: bfloat16 where the hardware supports it)")
    c.add_argument("--batch-size", type=int, default=64, help="teacher batch size (default 64)")
    c.add_argument("--chunk-rows", type=int, default=1024,
                   help="samples per shard; an interrupted build loses at most one chunk (default 1024)")
    c.add_argument("--limit", type=int, default=None, help="keep the first N samples of each --data spec")
    c.add_argument("--world-n", type=int, default=4000, help="images in a built-in world split (world:SPLIT)")
    c.add_argument("--data-cache", default="runs/.cache", help="cache folder for the built-in world")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--device", default=None, help="where the teacher runs (default: cuda if available, else cpu)")
    c.add_argument("--verify", metavar="DIR", help="check an existing cache completely and exit (1 if damaged)")
    c.add_argument("--quick", action="store_true", help="with --verify: skip checksums and value checks")
    c.set_defaults(func=cmd_cache)

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
    args = build_parser().parse_args(argv)
    from mmkd.config import ConfigError
    from mmkd.data.records import DataError
    from mmkd.models.hub import ModelLoadError
    from mmkd.teacher.cache import CacheError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, ModelLoadError, CacheError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mmkd: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
