"""``mmkd export STUDENT --out DIR --format onnx [--int8]``: the student as ONNX graphs an app can run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmkd.commands.common import DATA_SPECS, positive_int


def add_parser(sub: Any) -> None:
    q = sub.add_parser("export", help="a student as ONNX graphs (image, text; fp32 or int8), checked against PyTorch",
                       epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("student", help="the student folder (a run's OUT/student, or any dual encoder mmkd loads)")
    q.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier export: replaced)")
    q.add_argument("--format", default="onnx", choices=["onnx"], help="the only format: onnx")
    q.add_argument("--int8", action="store_true", help="quantise with onnxruntime: text dynamic, image static "
                                                       "with --calibration (else dynamic)")
    q.add_argument("--calibration", default=None, help="data spec of the images that calibrate the image graph's "
                                                       "static int8 (your own data)")
    q.add_argument("--calibration-n", type=positive_int, default=128, help="calibration images (default 128)")
    q.add_argument("--data", default="world:test", help="data spec of the real images (and captions) the parity "
                                                        "and zero-shot top-1 are checked on (default world:test)")
    q.add_argument("--limit", type=positive_int, default=256, help="check images (default 256)")
    q.add_argument("--class-set", default=None, help="world:… only: colour_shape (default), shape, colour")
    q.add_argument("--split", default="test", help="split for cifar10/cifar100/stl10 (default test)")
    q.add_argument("--cache", default="runs/.cache", help="cache folder for the built-in world")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmkd.errors import UsageError
    from mmkd.exporting import ExportOptions, export_student

    if args.calibration and not args.int8:
        raise UsageError("--calibration calibrates int8 quantisation: add --int8, or drop --calibration")
    opts = ExportOptions(Path(args.out), int8=args.int8, calibration=args.calibration,
                         calibration_n=args.calibration_n, data=args.data, limit=args.limit, class_set=args.class_set,
                         split=args.split, cache_dir=args.cache)
    manifest = export_student(args.student, opts, log=lambda m: print(m, file=sys.stderr))
    summary = {k: manifest[k] for k in ("precision", "parity", "zeroshot")}
    summary["graphs"] = {k: {"bytes": g["bytes"], **({"int8": g["int8"]} if "int8" in g else {})}
                         for k, g in manifest["graphs"].items()}
    print(json.dumps(summary, indent=2))
    print(f"exported: {args.out} (image.onnx, text.onnx, tokenizer files, mmkd_export.json)", file=sys.stderr)
    return 0
