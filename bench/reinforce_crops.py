"""Replayed views on the built-in world with the crop's area range swept (issue 21 item 3): the sweep of
``configs/reinforce/world_crops.yaml``.

Why: on the world, K = 10 replayed views hurt (``bench/reinforce_world.py``), and a suspected reason is that crops
cut the 11–20 px shape out of a 32 px image, or contradict captions naming positions. Here views are drawn on the
uncaptioned images only (``data.augment_paired: false``), and the crop's area range (``data.crop_scale``) is the
one thing that differs between the K = 10 settings; K = 1 (view 0, the plain image) is the baseline. Each step is
an ordinary mmkd command (printed before it runs), skipped or resumed when its output is already there:

1. the teacher: ``--teacher DIR`` (default ``runs/demo/teacher``: ``make demo``'s), trained with
   ``configs/demo/teacher.yaml`` only when the folder is absent;
2. one cache per crop range: ``mmkd cache --config CONFIG --views 10 --crop-scale LO,HI``;
3. ``mmkd sweep CONFIG --seeds N student.vision.source=TEACHER`` (the student inherits the teacher's layers 0, 7);
4. ``--json`` (default ``bench/results/reinforce_crops.json``): the leaderboard's rows, the caches' sizes and the
   time of each phase, for ``make readme``.

Usage: python bench/reinforce_crops.py [--teacher DIR] [--seeds 3] [--steps 200] [--json PATH]
(shortened from the demo's recipe to fit a 2-core machine: see the config's header; the full-size run is
``--steps 600`` with the config's ``world_size_unpaired: 20000``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from reinforce_world import mmkd, run, teacher_model  # bench/ is on sys.path when a script in it runs

CONFIG = "configs/reinforce/world_crops.yaml"
WORK = Path("runs/reinforce_crops")
VIEWS = 10
RANGES = {"cache-s035": (0.35, 1.0), "cache-s060": (0.6, 1.0), "cache-s090": (0.9, 1.0)}


def repo_relative(arg: str) -> str:
    """An absolute path as a path relative to the repository (what a bench JSON records), anything else as is."""
    return os.path.relpath(arg) if os.path.isabs(arg) and os.path.exists(arg) else arg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="runs/demo/teacher", help="the teacher's model folder (trained when absent)")
    ap.add_argument("--seeds", default="3", help="seeds per setting (mmkd sweep --seeds)")
    ap.add_argument("--steps", type=int, default=200, help="student steps (train.steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every step")
    ap.add_argument("--json", default="bench/results/reinforce_crops.json")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = Path(args.teacher)
    if not (teacher_model(teacher) / "config.json").is_file():
        run(mmkd("distill", "configs/demo/teacher.yaml", f"out={teacher}", f"train.threads={args.threads}",
                 "--resume-or-start"))
        phases["teacher"] = time.perf_counter() - t0
    model = Path(repo_relative(str(teacher_model(teacher).resolve())))
    for name, (lo, hi) in RANGES.items():
        t = time.perf_counter()
        # a finished cache is a no-op to rebuild (every segment is committed); a killed one resumes
        run(mmkd("cache", "--config", CONFIG, "--teacher", str(model), "--out", str(WORK / name), "--views",
                 str(VIEWS), "--crop-scale", f"{lo},{hi}", "--threads", str(args.threads)))
        phases[f"cache {name}"] = time.perf_counter() - t
    t = time.perf_counter()
    run(mmkd("sweep", CONFIG, "--seeds", args.seeds, f"student.vision.source={model}",
             f"train.steps={args.steps}", f"train.threads={args.threads}"))
    phases["sweep"] = time.perf_counter() - t

    from mmkd.teacher.cache import cache_size

    board = json.loads((WORK / "sweep" / "leaderboard.json").read_text())
    out: dict[str, Any] = {
        "command": shlex.join(["python", "bench/reinforce_crops.py", *map(repo_relative, sys.argv[1:])]),
        "config": CONFIG, "teacher": str(model), "steps": args.steps, "views": VIEWS,
        "seconds": round(time.perf_counter() - t0, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "caches": {name: {"crop_scale": list(r), **cache_size(WORK / name).to_json()} for name, r in RANGES.items()},
        "leaderboard": board,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    md = WORK / "sweep" / "leaderboard.md"
    if md.is_file():
        print(md.read_text())
    print(f"phases (s): {out['phases_s']}; total {out['seconds']} s")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
