"""Argument types and helpers several commands share."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from mmkd.errors import UsageError

DATA_SPECS = """data specs are FORMAT:PATH:
  world:SPLIT                      the built-in world (train, val, test, pool)
  jsonl:FILE                       one {"image": path, "captions": [...]} per line
  csv:FILE / tsv:FILE              columns filepath, title (open_clip's defaults)
  coco:FILE                        COCO captions JSON (images/ beside it)
  imagefolder:DIR                  DIR/<class>/*.jpg
  wds:SHARDS                       WebDataset tars (brace ranges allowed), .cls + classes.txt or .txt captions
  cifar10:DIR_OR_SHARDS  cifar100:DIR  stl10:DIR   their own on-disk formats (split: test)"""


def positive_int(text: str) -> int:
    """argparse type of counts and limits: a negative limit would silently drop samples from the end."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def model_paths(models: Sequence[str] | None, teacher: str | None) -> dict[str, str]:
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


DEVICE_HELP = "auto (cuda:LOCAL_RANK where CUDA exists, else cpu; the default), cpu, cuda, cuda:N"


def add_device_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--device``, as every command that runs a model takes it (``train.device`` in a run config)."""
    parser.add_argument("--device", default="auto", help=f"{what}: {DEVICE_HELP}")


def load_models(paths: dict[str, str], device: str = "auto") -> dict[str, Any]:
    """The models by name, on ``device`` (``--device``; a GPU asked for and absent fails before any is loaded)."""
    from mmkd.devices import resolve_device
    from mmkd.models.hub import load_dual_encoder

    where = resolve_device(device, "--device")
    return {name: load_dual_encoder(path).to(where) for name, path in paths.items()}


def write_json(path: str | None, obj: Any) -> None:
    """``--json FILE``: the full result written atomically, its path on stderr (stdout holds the result)."""
    if path:
        from mmkd.fileio import atomic_write_json

        atomic_write_json(path, obj)
        print(f"written: {path}", file=sys.stderr)
