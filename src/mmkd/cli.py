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


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None


def _study_config(args: argparse.Namespace, kd: list | None = None):
    """The matching study settings from the shared train/sweep flags; every bad value fails before compute."""
    from mmkd.matching.losses import KDConfig
    from mmkd.matching.models import StudentConfig
    from mmkd.matching.study import StudyConfig
    from mmkd.matching.train import StudentTrainConfig, TeacherTrainConfig

    resnet: object = StudentConfig().resnet
    if args.resnet:
        resnet = json.loads(args.resnet) if args.resnet.lstrip().startswith("{") else args.resnet
    if kd is None:
        kd = [KDConfig(v.strip(), args.temperature, args.alpha) for v in args.kd.split(",") if v.strip()]
    return StudyConfig(
        teacher=TeacherTrainConfig(head=args.head, trainable=args.teacher_trainable, epochs=args.teacher_epochs,
                                   batch_size=args.teacher_batch, lr=args.teacher_lr, head_lr=args.head_lr,
                                   seed=args.seed),
        student=StudentConfig(resnet=resnet, fusion=args.fusion, image_size=args.image_size),
        train=StudentTrainConfig(epochs=args.student_epochs, batch_size=args.student_batch, lr=args.student_lr,
                                 seed=args.seed, transfer=args.kd_transfer, transfer_top=args.kd_transfer_top),
        kd=kd, text_encoder=args.text_encoder)


def _study(args: argparse.Namespace, cfg):
    from mmkd.matching.data import load_pair_data
    from mmkd.matching.study import MatchingStudy

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = load_pair_data(args.pairs, args.cache)
    return MatchingStudy(data, args.teacher, args.out, cfg, text_cache=os.path.join(args.out, "text-features.npz"))


def cmd_matching_build(args: argparse.Namespace) -> int:
    from mmkd.data.matching import BuildConfig, build_pairs_file

    cfg = BuildConfig(negatives=args.negatives, seed=args.seed, captions_per_image=args.captions_per_image,
                      val_frac=args.val_frac, test_frac=args.test_frac, max_similarity=args.max_similarity,
                      hard_candidates=args.hard_candidates)
    path, counts = build_pairs_file(args.data, args.out, cfg, cache_dir=args.cache, world_n=args.world_n,
                                    limit=args.limit, text_encoder=args.text_encoder)
    print(json.dumps({"pairs": str(path), "counts": counts}, indent=2))
    return 0


def cmd_matching_train(args: argparse.Namespace) -> int:
    from mmkd.matching.report import model_table

    cfg = _study_config(args)
    metrics = _study(args, cfg).run()
    print()
    print(model_table(metrics["models"]))
    print(f"\nmetrics: {os.path.join(args.out, 'metrics.json')}   report: {os.path.join(args.out, 'report.md')}")
    return 0


def cmd_matching_sweep(args: argparse.Namespace) -> int:
    from mmkd.matching.report import leaderboard_md
    from mmkd.matching.sweep import grid, run_sweep

    configs = grid(_floats(args.temperatures, "--temperatures"), _floats(args.alphas, "--alphas"),
                   [v.strip() for v in args.variants.split(",") if v.strip()])
    cfg = _study_config(args, kd=configs)
    summary = run_sweep(_study(args, cfg), configs)
    print()
    print(leaderboard_md(summary["leaderboard"]))
    print(f"\nleaderboard: {os.path.join(args.out, 'leaderboard.md')} and leaderboard.csv")
    return 0


def cmd_matching_demo(args: argparse.Namespace) -> int:
    from mmkd.matching.demo import MatchingDemoConfig, run_matching_demo
    from mmkd.matching.report import demo_table

    cfg = MatchingDemoConfig.quick() if args.quick else MatchingDemoConfig()
    cfg.threads = args.threads
    coco = None if args.coco.lower() == "none" else args.coco
    results = run_matching_demo(args.out, quick=args.quick, teacher=args.teacher, cache_dir=args.cache, coco=coco,
                                cfg=cfg)
    print()
    print(demo_table(results))
    print(f"\nresults: {os.path.join(args.out, 'matching.json')}   report: {os.path.join(args.out, 'report.md')}")
    return 0


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="pairs file from `mmkd matching build`")
    p.add_argument("--teacher", required=True, help="dual encoder folder to fine-tune (or a matching teacher "
                                                    "folder, used as is)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--head", default="cosine", help="teacher matching head: cosine (a·cos+b) or mlp")
    p.add_argument("--teacher-trainable", default="all", choices=["all", "vision", "head"],
                   help="all: end to end (S2); vision: text tower frozen; head: both towers frozen")
    p.add_argument("--teacher-epochs", type=int, default=5, help="(S2: 5; 0 only calibrates the head)")
    p.add_argument("--teacher-lr", type=float, default=5e-5, help="Adam learning rate of the teacher (S2: 5e-5)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the matching head")
    p.add_argument("--teacher-batch", type=int, default=32)
    p.add_argument("--student-epochs", type=int, default=10, help="(S2: 10)")
    p.add_argument("--student-lr", type=float, default=1e-4, help="Adam learning rate of the students (S2: 1e-4)")
    p.add_argument("--student-batch", type=int, default=32)
    p.add_argument("--fusion", default="interact", help="student fusion: interact ([i,t,i*t,|i-t|] → linear) or "
                                                        "concat (S2's [i;t] → linear)")
    p.add_argument("--resnet", default=None, help="student ResNet: a local ResNetModel folder, or ResNetConfig "
                                                  "kwargs as JSON (default: a tiny basic-block ResNet)")
    p.add_argument("--image-size", type=int, default=32, help="student image size")
    p.add_argument("--kd-transfer", type=int, default=0,
                   help="KD students: unlabelled pairs scored by the teacher per labelled pair (its image with other "
                        "training captions; 0 = S2: labelled pairs only)")
    p.add_argument("--kd-transfer-top", type=int, default=32,
                   help="half the transfer captions come from the teacher's top-N for the image")
    p.add_argument("--text-encoder", default=None, help="student sentence encoder folder (default all-MiniLM-L6-v2)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order (same for every student)")
    p.add_argument("--cache", default=None, help="cache of the built-in world (default: the one the pairs used)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest for tiny models)")


def _add_matching(sub) -> None:
    m = sub.add_parser("matching", help="binary image–text matching: pairs, teacher, students, KD (S2)")
    msub = m.add_subparsers(dest="matching_command", required=True)

    b = msub.add_parser("build", help="build balanced matching/mismatching pairs", epilog=DATA_SPECS,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--data", required=True, help="data spec FORMAT:PATH (see below)")
    b.add_argument("--out", required=True, help="pairs JSONL file to write (a FILE.meta.json is written beside)")
    b.add_argument("--negatives", default="random", choices=["random", "hard", "mixed"],
                   help="random: another image's caption (S2); hard: the most similar other caption (and on the "
                        "world, attribute swaps); mixed: half and half")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--captions-per-image", type=int, default=1, help="pairs per image (S2: 1)")
    b.add_argument("--val-frac", type=float, default=0.1)
    b.add_argument("--test-frac", type=float, default=0.1)
    b.add_argument("--hard-candidates", default="all", choices=["all", "drawn"],
                   help="hard negatives among all captions of the split, or only the captions drawn for pairs")
    b.add_argument("--max-similarity", type=float, default=0.95,
                   help="hard candidates this similar or more count as paraphrases and are skipped")
    b.add_argument("--limit", type=int, default=None, help="use the first N images only")
    b.add_argument("--world-n", type=int, default=4000, help="images in a built-in world split")
    b.add_argument("--cache", default="runs/.cache", help="cache folder for the built-in world")
    b.add_argument("--text-encoder", default=None, help="sentence encoder folder for hard negatives "
                                                        "(default all-MiniLM-L6-v2)")
    b.set_defaults(func=cmd_matching_build)

    t = msub.add_parser("train", help="fine-tune the teacher's matcher, train the baseline and KD students")
    _add_study_args(t)
    t.add_argument("--kd", default="kl,bce", help="KD variants to train (comma list of: kl, bce)")
    t.add_argument("--temperature", "-T", type=float, default=3.0, help="KD temperature T > 0 (S2's best: 3)")
    t.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term in [0, 1] (S2's best: 0.5)")
    t.set_defaults(func=cmd_matching_train)

    s = msub.add_parser("sweep", help="both KD variants over temperatures × alphas, with a leaderboard")
    _add_study_args(s)
    s.add_argument("--temperatures", default="1.5,2,2.5,3")
    s.add_argument("--alphas", default="0.4,0.5,0.6")
    s.add_argument("--variants", default="kl,bce")
    s.set_defaults(func=cmd_matching_sweep)

    d = msub.add_parser("demo", help="build → teacher → baseline → KD on the world (random, hard) and COCO")
    d.add_argument("--out", default="runs/matching", help="output folder (default runs/matching)")
    d.add_argument("--quick", action="store_true", help="tiny data and budgets (seconds)")
    d.add_argument("--teacher", default=None, help="dual encoder to start from (default: mmkd's demo teacher "
                                                   "recipe, trained once into the cache)")
    d.add_argument("--cache", default=None, help="cache folder (default OUT/cache)")
    d.add_argument("--coco", default="../shared/data/coco-mini",
                   help="folder with captions.jsonl and images/ (COCO photos); 'none' to skip")
    d.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for these sizes)")
    d.set_defaults(func=cmd_matching_demo)


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

    _add_matching(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
