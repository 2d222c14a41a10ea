"""``mmkd matching build|train|sweep|demo CONFIG [key=value ...]``: the study's commands, registered by
``add_parser`` so ``mmkd.cli`` wires them in without knowing their options.

Everything the study does is set in its YAML config (``configs/matching/``) and changed with ``key=value``
overrides, as ``mmkd distill`` does; the few flags here are command options (``--out``, ``--threads``,
``--quick``). Imports are lazy: building the parser must not load torch.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

EPILOG = """configure with key=value overrides of the YAML config, e.g.
  pairs.source=jsonl:my/captions.jsonl pairs.file=runs/m/pairs.jsonl pairs.build.negatives=hard
  teacher.source=path/to/clip teacher.epochs=1 train.lr=1e-3 kd.0.alpha=0.7 sweep.alphas=[0.4,0.6]
data specs are FORMAT:PATH (world:SPLIT, jsonl:FILE, csv:FILE, coco:FILE, imagefolder:DIR, wds:SHARDS; see
`mmkd cache --help`); model sources are folders or hub ids."""


def _config(args: argparse.Namespace, demo: bool = False) -> Any:
    from mmkd.studies.matching.config import DemoConfig, MatchingConfig, load_matching_config

    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"out={json.dumps(args.out)}")
    if getattr(args, "threads", None):
        overrides.append(f"threads={args.threads}")
    if getattr(args, "device", None):
        overrides.append(f"device={json.dumps(args.device)}")
    cfg = load_matching_config(args.config, overrides, DemoConfig if demo else MatchingConfig,
                               quick=getattr(args, "quick", False))
    if hasattr(args, "device"):  # a GPU asked for and absent fails before any data or model is read
        from mmkd.devices import resolve_device

        resolve_device(cfg.device, "device")
    return cfg


def _study(cfg: Any) -> Any:
    from pathlib import Path

    from mmkd.studies.matching.data import load_pair_data
    from mmkd.studies.matching.pretrain import check_teacher, teacher_source
    from mmkd.studies.matching.study import MatchingStudy

    check_teacher(cfg)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    data = load_pair_data(cfg.pairs.file, cfg.pairs.cache_dir)
    return MatchingStudy(data, teacher_source(cfg), cfg.out, cfg, text_cache=Path(cfg.cache) / "text-features.npz")


def cmd_build(args: argparse.Namespace) -> int:
    from mmkd.studies.matching.pairfile import build_pairs_file

    cfg = _config(args)
    p = cfg.pairs
    path, counts = build_pairs_file(p.source, p.file, p.build, cache_dir=p.cache_dir, world_n=p.world_n,
                                    limit=p.limit, text_encoder=cfg.text_encoder)
    print(json.dumps({"pairs": str(path), "counts": counts}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mmkd.studies.matching.report import model_table

    cfg = _config(args)
    metrics = _study(cfg).run()
    print()
    print(model_table(metrics["models"]))
    print(f"\nmetrics: {os.path.join(cfg.out, 'metrics.json')}   report: {os.path.join(cfg.out, 'report.md')}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from mmkd.studies.matching.report import leaderboard_md
    from mmkd.studies.matching.sweep import run_sweep

    cfg = _config(args)
    summary = run_sweep(_study(cfg), cfg.sweep.configs())
    print()
    print(leaderboard_md(summary["leaderboard"]))
    print(f"\nleaderboard: {os.path.join(cfg.out, 'leaderboard.md')} and leaderboard.csv")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmkd.studies.matching.demo import run_matching_demo
    from mmkd.studies.matching.report import demo_table

    cfg = _config(args, demo=True)
    results = run_matching_demo(cfg, quick=args.quick)
    print()
    print(demo_table(results))
    print(f"\nresults: {os.path.join(cfg.out, 'matching.json')}   report: {os.path.join(cfg.out, 'report.md')}")
    return 0


COMMANDS = {
    "build": ("build balanced matching/mismatching pairs from pairs.source into pairs.file", cmd_build),
    "train": ("fine-tune the teacher's matcher, train the baseline and the KD students (kd) on pairs.file",
              cmd_train),
    "sweep": ("the KD variants over sweep.temperatures × sweep.alphas on pairs.file, with a leaderboard",
              cmd_sweep),
    "demo": ("build → teacher → baseline → KD on every pairs set of the config's settings", cmd_demo),
}


def add_parser(subparsers: Any) -> None:
    """Register ``mmkd matching`` and its subcommands on the top-level ``mmkd`` subparsers."""
    m = subparsers.add_parser("matching", help="binary image–text matching: pairs, teacher, students, KD")
    msub = m.add_subparsers(dest="matching_command", required=True)
    for name, (text, func) in COMMANDS.items():
        p = msub.add_parser(name, help=text, description=text, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        default = "configs/matching/demo.yaml" if name == "demo" else "configs/matching/study.yaml"
        p.add_argument("config", help=f"the study's YAML config (e.g. {default})")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
        if name != "build":
            p.add_argument("--out", default=None, help="output folder (the config's out)")
            p.add_argument("--threads", type=int, default=None, help="torch threads (the config's threads)")
            p.add_argument("--device", default=None,
                           help="where the teacher and students run: auto (cuda:LOCAL_RANK where CUDA exists, else "
                                "cpu; the default), cpu, cuda, cuda:N (the config's device)")
        if name == "demo":
            p.add_argument("--quick", action="store_true",
                           help="apply the config's quick section: tiny data and budgets (seconds)")
        p.set_defaults(func=func)
