"""``mmkd eval zeroshot|retrieval|bias|efficiency|all``: every kind through the one dispatch of
``mmkd.eval.tasks``, the options of each turned into an ``EvalSpec``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmkd.commands.common import DATA_SPECS, add_device_option, load_models, model_paths, positive_int, write_json

MODEL_HELP = ("model folder or hub id (zeroshot and retrieval: also a folder of mmkd export, run by onnxruntime); "
              "NAME=PATH names it; repeat to compare several")


def add_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="evaluate models: zeroshot, retrieval, bias, efficiency, all",
                       epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = e.add_subparsers(dest="task", required=True, metavar="{zeroshot,retrieval,bias,efficiency,all}")

    for task, text in (("zeroshot", "zero-shot classification: top1, top5, mean per-class recall"),
                       ("retrieval", "image<->text retrieval: recall@1/5/10 both ways, mean/median rank")):
        q = tasks.add_parser(task, help=text, epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("--model", required=True, help="model folder or hub id")
        _data_options(q, True)
        if task == "zeroshot":
            q.add_argument("--class-set", default=None, help="built-in world class set: colour_shape, shape, colour")
            q.add_argument("--templates", default=None,
                           help="prompt templates: a file (one per line, {c} = class) or a built-in ensemble "
                                "(cifar10, cifar100, stl10, imagenet); default: by data format")
            q.add_argument("--sigmoid", action="store_true",
                           help="also report SigLIP's sigmoid probabilities (mean of the true class's, the top "
                                "one's, the others'); models with a learnt logit bias only")
        add_device_option(q, "where the model runs")
        q.set_defaults(func=run_single, task=task)

    q = tasks.add_parser("bias", help="gender-profession bias probe, teacher vs student(s)")
    q.add_argument("--model", action="append", required=True, help=MODEL_HELP)
    q.add_argument("--teacher", default=None, help="the reference model (its maps are compared with the others)")
    _data_options(q, False)
    q.add_argument("--words", default=None, help="word-list YAML (default: mmkd's assets/bias_words.yaml)")
    q.add_argument("--template", default=None, help="prompt for the text probe, {} = word (default: the word file's)")
    q.add_argument("--min-group-images", type=int, default=5, help="fewest images per caption group (image probe)")
    q.add_argument("--json", default=None, help="also write the full result (matrices included) to this file")
    add_device_option(q, "where the models run")
    q.set_defaults(func=run_bias)

    q = tasks.add_parser("efficiency", help="parameters, FLOPs, latency/throughput, peak memory")
    q.add_argument("--model", action="append", required=True, help=MODEL_HELP)
    q.add_argument("--teacher", default=None, help="a teacher to measure in the same run")
    q.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="latency batch sizes (default 1 64)")
    q.add_argument("--budget", type=float, default=3.0, help="seconds of timing per model (default 3)")
    q.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default: torch's)")
    q.add_argument("--json", default=None, help="also write the result to this file")
    add_device_option(q, "where the models are timed")
    q.set_defaults(func=run_efficiency)

    q = tasks.add_parser("all", help="a suite YAML (zeroshot, retrieval, bias, efficiency) into OUT/metrics.json")
    q.add_argument("--model", action="append", required=True, help=MODEL_HELP)
    q.add_argument("--teacher", default=None, help="the teacher, evaluated too and the reference of comparisons")
    q.add_argument("--suite", required=True, help="suite YAML (see configs/suites/)")
    q.add_argument("--out", default="runs/eval", help="output folder for metrics.json (default runs/eval)")
    q.add_argument("--limit", type=positive_int, default=None, help="cap every data set at N samples (quick tries)")
    add_device_option(q, "where the models run")
    q.set_defaults(func=run_all)


def _data_options(q: argparse.ArgumentParser, need_data: bool) -> None:
    q.add_argument("--data", required=need_data, help="data spec FORMAT:PATH (see mmkd eval --help)")
    q.add_argument("--split", default="test", help="split for cifar10/cifar100/stl10 (default test)")
    q.add_argument("--limit", type=positive_int, default=None, help="evaluate on the first N samples only")
    q.add_argument("--cache", default="runs/.cache", help="cache folder for the built-in world")
    q.add_argument("--world-n", type=int, default=2000, help="images in a built-in world split")


def _context(args: argparse.Namespace, models: dict[str, Any]) -> Any:
    from mmkd.eval.tasks import EvalContext

    # stdout holds the JSON result: the dispatch's progress lines are not printed
    return EvalContext(models, getattr(args, "cache", "runs/.cache"), getattr(args, "world_n", None),
                       log=lambda _: None)


def run_single(args: argparse.Namespace) -> int:
    """``mmkd eval zeroshot|retrieval``: one model, one data set, JSON on stdout."""
    from mmkd.config import EvalSpec
    from mmkd.devices import resolve_device
    from mmkd.eval.tasks import run_spec
    from mmkd.models.onnx_model import load_scorable

    device = resolve_device(args.device, "--device")
    ctx = _context(args, {"model": load_scorable(args.model).to(device)})
    spec = EvalSpec(args.task, args.data, class_set=getattr(args, "class_set", None), split=args.split,
                    limit=args.limit, templates=getattr(args, "templates", None),
                    sigmoid=getattr(args, "sigmoid", False))
    n = len(ctx.records(spec))
    result = run_spec(spec, ctx)["model"]
    print(json.dumps({"model": args.model, "data": args.data, "n": n, args.task: result}, indent=2))
    return 0


def run_bias(args: argparse.Namespace) -> int:
    from mmkd.config import EvalSpec
    from mmkd.eval.bias import format_bias, load_bias_words
    from mmkd.eval.tasks import run_spec

    load_bias_words(args.words, args.template)  # a bad word list fails before any model is loaded
    ctx = _context(args, load_models(model_paths(args.model, args.teacher), args.device))
    spec = EvalSpec("bias", args.data, split=args.split, limit=args.limit, words=args.words, template=args.template,
                    min_group_images=args.min_group_images)
    result = run_spec(spec, ctx)
    print(format_bias(result))
    write_json(args.json, {"bias": result})
    return 0


def run_efficiency(args: argparse.Namespace) -> int:
    from mmkd.config import EvalSpec
    from mmkd.eval.tasks import run_spec

    ctx = _context(args, load_models(model_paths(args.model, args.teacher), args.device))
    spec = EvalSpec("efficiency", batch_sizes=args.batch_sizes, budget_s=args.budget, threads=args.threads)
    result = {"models": run_spec(spec, ctx)}
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return 0


def run_all(args: argparse.Namespace) -> int:
    from mmkd.eval.runner import evaluate_all
    from mmkd.report.collect import load_runs
    from mmkd.report.page import comparison_table, table_markdown

    paths = model_paths(args.model, args.teacher)
    evaluate_all(args.suite, paths, args.out, args.limit, log=lambda m: print(m, file=sys.stderr), device=args.device)
    print(table_markdown(comparison_table(load_runs([args.out]))))
    print(f"\nmetrics: {Path(args.out) / 'metrics.json'}   report: mmkd report {args.out} --out report.html")
    return 0
