"""``mmkd distill CONFIG [key=value ...]``: one distillation run from a YAML config."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    s = sub.add_parser("distill", help="distil a teacher into a student from a YAML config")
    s.add_argument("config", help="YAML run config (see configs/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue the run in OUT from its newest checkpoint (fails if there is none or it was "
                          "written by another config; see README: run folders)")
    how.add_argument("--resume-or-start", action="store_true",
                     help="continue from the newest checkpoint when OUT has one, else start the run")
    how.add_argument("--overwrite", action="store_true",
                     help="start afresh in an OUT that holds another run, moving that run aside to OUT.old-<time>")
    s.add_argument("--ignore-fingerprint", action="store_true",
                   help="with teacher: cache:DIR, use a cache built for other data or transforms (at your risk)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmkd.config import load_config
    from mmkd.data.records import set_max_image_pixels
    from mmkd.pipeline import run_distill

    overrides = list(args.overrides) + (["train.ignore_cache_fingerprint=true"] if args.ignore_fingerprint else [])
    cfg = load_config(args.config, overrides)
    set_max_image_pixels(cfg.data.max_image_pixels)
    metrics = run_distill(cfg, resume="auto" if args.resume_or_start else args.resume, overwrite=args.overwrite)
    print(json.dumps(metrics, indent=2))
    return 0
