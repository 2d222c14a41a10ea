"""The ``mmkd`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from mmkd.errors import MmkdError, UsageError

DATA_SPECS = """data specs are FORMAT:PATH:
  world:SPLIT                      the built-in world (train, val, test, pool)
  jsonl:FILE                       one {"image": path, "captions": [...]} per line
  csv:FILE / tsv:FILE              columns filepath, title (open_clip's defaults)
  coco:FILE                        COCO captions JSON (images/ beside it)
  imagefolder:DIR                  DIR/<class>/*.jpg
  wds:SHARDS                       WebDataset tars (brace ranges allowed), .cls + classes.txt or .txt captions
  cifar10:DIR_OR_SHARDS  cifar100:DIR  stl10:DIR   their own on-disk formats (split: test)"""


# packages that register their own subcommands: each module exposes ``add_parser(subparsers)``
COMMAND_MODULES = ("mmkd.studies.matching.cli",)


def positive_int(text: str) -> int:
    """argparse type of counts and limits: a negative limit would silently drop samples from the end."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _print_table(metrics: dict[str, Any]) -> None:
    from mmkd.report.demo_report import markdown_table, table_rows

    print(markdown_table(table_rows(metrics)))


def cmd_demo(args: argparse.Namespace) -> int:
    from mmkd.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, cache_dir=args.cache, config_dir=args.configs)
    print()
    _print_table(metrics)
    print("\ntime per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in metrics["demo"]["phases_s"].items())
          + f"; total {metrics['demo']['seconds'] / 60:.1f} min")
    print(f"\nmetrics: {os.path.join(args.out, 'metrics.json')}   report: {os.path.join(args.out, 'report.html')} "
          f"(and report.md)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from mmkd.config import load_config
    from mmkd.data.records import set_max_image_pixels
    from mmkd.distill import run_distill

    overrides = list(args.overrides) + (["train.ignore_cache_fingerprint=true"] if args.ignore_fingerprint else [])
    cfg = load_config(args.config, overrides)
    set_max_image_pixels(cfg.data.max_image_pixels)
    metrics = run_distill(cfg, resume="auto" if args.resume_or_start else args.resume, overwrite=args.overwrite)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    if args.verify:
        if args.teacher or args.data or args.config:
            raise UsageError("--verify DIR checks an existing cache; it takes no --teacher/--data/--config")
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
        raise UsageError("give at least one --model PATH (and optionally --teacher PATH)")
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


def cmd_readme(args: argparse.Namespace) -> int:
    from mmkd.report.readme import update_readme

    done = update_readme(args.readme, args.root, args.section or None)
    print(f"{args.readme}: regenerated {', '.join(done) or 'no section'}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkd", description="Multimodal knowledge distillation for CLIP-style models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a teacher on the built-in world, distil it, compare with scratch")
    d.add_argument("--quick", action="store_true", help="tiny models and budgets (about a minute)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--cache", default=None, help="cache folder for world data and the teacher (default OUT/cache)")
    d.add_argument("--configs", default="configs/demo",
                   help="folder of the demo's run configs (default configs/demo, from the repository root)")
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
    c.add_argument("--limit", type=positive_int, default=None, help="keep the first N samples of each --data spec")
    c.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a bad sample (e.g. a shard member missing): stop naming it (default) or skip and count it")
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
        q.add_argument("--limit", type=positive_int, default=None, help="evaluate on the first N samples only")
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
    q.add_argument("--limit", type=positive_int, default=None, help="cap every data set at N samples (quick tries)")
    q.set_defaults(func=cmd_eval_all)

    r = sub.add_parser("report", help="an HTML page (+ Markdown) comparing the models of one or more runs")
    r.add_argument("runs", nargs="+", help="run folders holding metrics.json (mmkd demo, eval all, distill)")
    r.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    r.add_argument("--md", default=None, help="Markdown file (default: the HTML path with .md); PNGs go beside it")
    r.add_argument("--no-md", action="store_true", help="write the HTML page only")
    r.add_argument("--title", default="mmkd report", help="page title")
    r.set_defaults(func=cmd_report)

    rd = sub.add_parser("readme", help="regenerate the README's results sections from the runs' JSON")
    rd.add_argument("--readme", default="README.md", help="the file whose <!-- results:NAME --> blocks to rewrite")
    rd.add_argument("--root", default=".", help="project root the JSON paths are read under (default .)")
    rd.add_argument("--section", action="append", default=[], metavar="NAME",
                    help="only this section (repeatable; default: every marked one)")
    rd.set_defaults(func=cmd_readme)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return p


DEBUG_ENV = "MMKD_DEBUG"

# what to do about an OSError, by errno: the file is named from the error itself
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another folder",
    errno.EACCES: "check its permissions or choose another folder",
    errno.EPERM: "check its permissions or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.EBUSY: "it is in use by another program: close that program or choose another path",
    errno.ETXTBSY: "it is in use by another program: close that program or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
    errno.ENAMETOOLONG: "shorten the path",
    errno.EIO: "the disk reported an I/O error: check the disk and rerun",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file(s), the system's reason and what to do."""
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e)
    hint = _OS_HINTS.get(e.errno or -1, "check the path and rerun")
    return f"{where + ': ' if where else ''}{reason}; {hint}"


def interrupted_step(tb: TracebackType | None) -> int | None:
    """The optimizer steps completed when Ctrl-C stopped ``mmkd.train.loop.train``, read from its frame.

    Read from the traceback rather than threaded through every caller, so that the training loop needs no
    interrupt handling of its own: ``done`` (steps finished) once a step has finished in this process, else
    ``step`` (where the loop is, i.e. the steps finished before it). None when training was not running.
    """
    from mmkd.train.loop import train

    step = None
    for frame, _ in traceback.walk_tb(tb):
        if frame.f_code is train.__code__:
            local = frame.f_locals
            value = local.get("done", local.get("step"))
            step = int(value) if isinstance(value, int) else step
    return step


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command, turning every failure into one line on stderr and an exit status.

    2: a problem the user can fix (an ``MmkdError`` or an ``OSError``); 130: Ctrl-C; 1: anything else (a bug),
    with its traceback when ``MMKD_DEBUG=1``.
    """
    import warnings

    from PIL import Image

    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    pixel_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # the command's image limit and warning filter end with the command
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse before decoding, not after
            from mmkd.data.records import max_image_pixels_from_env, set_max_image_pixels

            set_max_image_pixels(max_image_pixels_from_env())
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        step = interrupted_step(e.__traceback__) if getattr(args, "command", None) == "distill" else None
        print("mmkd: interrupted" + (f" at step {step}; resume with --resume" if step is not None else ""),
              file=sys.stderr)
        return 130
    except (MmkdError, OSError) as e:
        if debug:
            traceback.print_exc()
        msg = str(e) if isinstance(e, MmkdError) else os_error_message(e)
        print(f"mmkd: error: {_one_line(msg)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(f"mmkd: internal error: {type(e).__name__}: {_one_line(str(e))} "
              f"(rerun with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        Image.MAX_IMAGE_PIXELS = pixel_limit


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse gives a nargs='*' positional only one chance)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
