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
    print(f"\nmetrics: {os.path.join(args.out, 'metrics.json')}   report: {os.path.join(args.out, 'report.html')} "
          f"(and report.md)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from mmkd.config import load_config
    from mmkd.distill import run_distill

    overrides = list(args.overrides) + (["train.ignore_cache_fingerprint=true"] if args.ignore_fingerprint else [])
    cfg = load_config(args.config, overrides)
    metrics = run_distill(cfg, resume="auto" if args.resume_or_start else args.resume, overwrite=args.overwrite)
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


def _model_paths(models: Sequence[str] | None, teacher: str | None) -> dict[str, str]:
    """``--teacher PATH`` is "teacher"; ``--model [NAME=]PATH`` (repeatable) is NAME, else "student" when it is
    the only one, else its folder name."""
    out: dict[str, str] = {}
    if teacher:
        out["teacher"] = teacher
    models = list(models or [])
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or os.path.exists(item):
            name, path = ("student" if len(models) == 1 else os.path.basename(os.path.normpath(item))), item
        base, i = name, 2
        while name in out:
            name, i = f"{base}_{i}", i + 1
        out[name] = path
    if not out:
        raise ValueError("give at least one --model PATH (and optionally --teacher PATH)")
    return out


def _load_models(paths: dict[str, str]) -> dict[str, Any]:
    from mmkd.models.hub import load_dual_encoder

    return {name: load_dual_encoder(path) for name, path in paths.items()}


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        from mmkd.fileio import atomic_write_json

        atomic_write_json(path, obj)
        print(f"written: {path}", file=sys.stderr)


def cmd_eval_single(args: argparse.Namespace) -> int:
    """``mmkd eval zeroshot|retrieval``: one model, one data set, JSON on stdout."""
    from mmkd.data.resolve import zeroshot_classes
    from mmkd.eval.runner import data_format, eval_records
    from mmkd.eval.suite import retrieval, world_labels, zeroshot
    from mmkd.models.hub import load_dual_encoder

    model = load_dual_encoder(args.model)
    records = eval_records(args.data, args.cache, args.world_n, args.split, args.limit)
    if args.task == "zeroshot":
        names, templates = zeroshot_classes(args.data, args.class_set, args.templates, args.split)
        labels = world_labels(records, args.class_set or "colour_shape") if data_format(args.data) == "world" \
            else None
        result = zeroshot(model, records, names, templates, labels)
    else:
        result = retrieval(model, records)
    print(json.dumps({"model": args.model, "data": args.data, "n": len(records), args.task: result}, indent=2))
    return 0


def cmd_eval_bias(args: argparse.Namespace) -> int:
    from mmkd.eval.bias import bias_probe, load_bias_words
    from mmkd.eval.runner import eval_records

    words = load_bias_words(args.words, args.template)
    models = _load_models(_model_paths(args.model, args.teacher))
    records = eval_records(args.data, args.cache, args.world_n, args.split, args.limit) if args.data else None
    result = bias_probe(models, words, "teacher", records, args.data, args.min_group_images)
    print(format_bias(result))
    _write_json(args.json, {"bias": result})
    return 0


def format_bias(bias: dict[str, Any]) -> str:
    """Per-profession gender scores side by side, then the comparison with the reference."""
    names = list(bias["models"])
    lines = []
    for kind in ("text", "image"):
        if not all(kind in bias["models"][n] for n in names):
            continue
        first = bias["models"][names[0]][kind]
        lines.append(f"gender score per profession ({kind} probe; > 0: closer to the female terms)")
        lines.append(f"{'profession':<16}" + "".join(f"{n:>14}" for n in names))
        for j, prof in enumerate(first["professions"]):
            lines.append(f"{prof:<16}" + "".join(f"{bias['models'][n][kind]['gender_score'][j]:>14.4f}"
                                                 for n in names))
        lines.append(f"{'mean |score|':<16}" + "".join(f"{bias['models'][n][kind]['mean_abs_gender_score']:>14.4f}"
                                                      for n in names))
        if kind == "image":
            lines.append(f"images: {first['n_images']['female']} female-caption, {first['n_images']['male']} "
                         f"male-caption ({bias.get('data')})")
        for n, comp in bias.get("vs_reference", {}).items():
            c = comp.get(kind)
            if c:
                rho = "undefined" if c["spearman"] is None else f"{c['spearman']:.3f}"
                ratio = c.get("normalised_strength_ratio")
                lines.append(f"{n} vs {bias['reference']}: mean |Δ| {c['mean_abs_delta']:.4f}, max |Δ| "
                             f"{c['max_abs_delta']:.4f}, Spearman {rho}, same sign {100 * c['sign_agreement']:.0f}%, "
                             f"bias strength {'undefined' if ratio is None else f'{ratio:.2f}'} × (spread-normalised)")
        lines.append("")
    if bias.get("image_skipped"):
        lines.append(f"image probe skipped: {bias['image_skipped']}")
    return "\n".join(lines).rstrip()


def cmd_eval_efficiency(args: argparse.Namespace) -> int:
    from mmkd.eval.efficiency import efficiency_metrics

    models = _load_models(_model_paths(args.model, args.teacher))
    result = {"models": {name: efficiency_metrics(m, args.batch_sizes, args.budget, threads=args.threads)
                         for name, m in models.items()}}
    print(json.dumps(result, indent=2))
    _write_json(args.json, result)
    return 0


def cmd_eval_all(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmkd.eval.runner import evaluate_all
    from mmkd.report.collect import load_runs
    from mmkd.report.page import comparison_table, table_markdown

    paths = _model_paths(args.model, args.teacher)
    evaluate_all(args.suite, paths, args.out, args.limit, log=lambda m: print(m, file=sys.stderr))
    print(table_markdown(comparison_table(load_runs([args.out]))))
    print(f"\nmetrics: {Path(args.out) / 'metrics.json'}   report: mmkd report {args.out} --out report.html")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmkd.report.page import write_report

    out = Path(args.out)
    md = None if args.no_md else Path(args.md) if args.md else out.with_suffix(".md")
    report = write_report(args.runs, out, md, args.title)
    print(f"report: {out} ({len(report.figures)} figures, {len(report.tables)} tables)"
          + (f"; markdown: {md}" if md else ""))
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

    e = sub.add_parser("eval", help="evaluate models: zeroshot, retrieval, bias, efficiency, all",
                       epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = e.add_subparsers(dest="task", required=True, metavar="{zeroshot,retrieval,bias,efficiency,all}")

    def data_options(q: argparse.ArgumentParser, need_data: bool) -> None:
        q.add_argument("--data", required=need_data, help="data spec FORMAT:PATH (see mmkd eval --help)")
        q.add_argument("--split", default="test", help="split for cifar10/cifar100/stl10 (default test)")
        q.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
        q.add_argument("--cache", default="runs/.cache", help="cache folder for the built-in world")
        q.add_argument("--world-n", type=int, default=2000, help="images in a built-in world split")

    for task, text in (("zeroshot", "zero-shot classification: top1, top5, mean per-class recall"),
                       ("retrieval", "image<->text retrieval: recall@1/5/10 both ways, mean/median rank")):
        q = tasks.add_parser(task, help=text, epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("--model", required=True, help="model folder or hub id")
        data_options(q, True)
        if task == "zeroshot":
            q.add_argument("--class-set", default=None, help="built-in world class set: colour_shape, shape, colour")
            q.add_argument("--templates", default=None,
                           help="prompt templates: a file (one per line, {c} = class) or a built-in ensemble "
                                "(cifar10, cifar100, stl10, imagenet); default: by data format")
        q.set_defaults(func=cmd_eval_single, task=task)

    model_help = "model folder or hub id; NAME=PATH names it; repeat to compare several"
    q = tasks.add_parser("bias", help="gender-profession bias probe, teacher vs student(s)")
    q.add_argument("--model", action="append", required=True, help=model_help)
    q.add_argument("--teacher", default=None, help="the reference model (its maps are compared with the others)")
    data_options(q, False)
    q.add_argument("--words", default=None, help="word-list YAML (default: mmkd's assets/bias_words.yaml)")
    q.add_argument("--template", default=None, help="prompt for the text probe, {} = word (default: the word file's)")
    q.add_argument("--min-group-images", type=int, default=5, help="fewest images per caption group (image probe)")
    q.add_argument("--json", default=None, help="also write the full result (matrices included) to this file")
    q.set_defaults(func=cmd_eval_bias)

    q = tasks.add_parser("efficiency", help="parameters, FLOPs, latency/throughput, peak memory")
    q.add_argument("--model", action="append", required=True, help=model_help)
    q.add_argument("--teacher", default=None, help="a teacher to measure in the same run")
    q.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="latency batch sizes (default 1 64)")
    q.add_argument("--budget", type=float, default=3.0, help="seconds of timing per model (default 3)")
    q.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default: torch's)")
    q.add_argument("--json", default=None, help="also write the result to this file")
    q.set_defaults(func=cmd_eval_efficiency)

    q = tasks.add_parser("all", help="a suite YAML (zeroshot, retrieval, bias, efficiency) into OUT/metrics.json")
    q.add_argument("--model", action="append", required=True, help=model_help)
    q.add_argument("--teacher", default=None, help="the teacher, evaluated too and the reference of comparisons")
    q.add_argument("--suite", required=True, help="suite YAML (see configs/suites/)")
    q.add_argument("--out", default="runs/eval", help="output folder for metrics.json (default runs/eval)")
    q.add_argument("--limit", type=int, default=None, help="cap every data set at N samples (quick tries)")
    q.set_defaults(func=cmd_eval_all)

    r = sub.add_parser("report", help="an HTML page (+ Markdown) comparing the models of one or more runs")
    r.add_argument("runs", nargs="+", help="run folders holding metrics.json (mmkd demo, eval all, distill)")
    r.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    r.add_argument("--md", default=None, help="Markdown file (default: the HTML path with .md); PNGs go beside it")
    r.add_argument("--no-md", action="store_true", help="write the HTML page only")
    r.add_argument("--title", default="mmkd report", help="page title")
    r.set_defaults(func=cmd_report)

    _add_matching(sub)
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
    from mmkd.teacher.cache import CacheError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, ModelLoadError, CacheError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mmkd: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
