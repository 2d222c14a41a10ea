"""Dataset reinforcement on real photos (issue 21 item 3): does a cache of K = 10 stored views pay on CIFAR-10, and
more the longer the schedule, as MobileCLIP and Apple's ml-dr found?

Students distilled from teacher caches with K = 1 (view 0 only: no augmentation), K = 10 (random-resized crop +
flip) and K = 10 + RandAugment(2, 9), at three schedule lengths, the same steps for every K, with MobileCLIP's loss
for every row (``recipe: mobileclip``: dr_clip on the replayed views); the recipe, student and data are
``configs/reinforce/cifar10.yaml``. Each step is an ordinary mmkd command (printed before it runs), skipped or
resumed when its output is already there, so a stopped study continues where it stopped:

1. the teacher: ``--teacher DIR`` (a saved model), trained with ``configs/cifar10_teacher.yaml`` only when absent;
   its own zero-shot top-1 on the test images (``mmkd eval zeroshot``), for reference;
2. the caches: ``mmkd cache --config CONFIG --views 10 --hflip [--randaugment 2,9]`` (K = 1 reads view 0 of the
   first, which is the plain image whatever the augmentation);
3. per schedule S (steps): ``mmkd sweep CONFIG --seeds N train.steps=S --out WORK/steps-S`` (baseline: K = 1);
4. ``--json`` (default ``bench/results/reinforce_cifar.json``): every schedule's leaderboard rows, the caches'
   sizes, the teacher's top-1 and the time of each phase, for ``make readme``.

Extra controls (``--variant NAME:KEY=VALUE;KEY=VALUE``, repeatable) add settings to every schedule's sweep, e.g.
``--cache 'cache-s035:--hflip --crop-scale 0.35,1' --variant 'k10_s035:teacher=cache:runs/reinforce_cifar/cache-s035;
data.views=10'`` (a cache built with other settings is refused by the run, so each control names its own).

Usage: python bench/reinforce_cifar.py --teacher DIR [--seeds 3] [--epochs 2,8,30] [--images 5000] [--batch 128]
       [--work runs/reinforce_cifar] [--json PATH]   (the full-data study: --images 50000)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIG = "configs/reinforce/cifar10.yaml"
DEFAULT_WORK = Path("runs/reinforce_cifar")  # where CONFIG's variants read their caches
TEACHER_CONFIG = "configs/cifar10_teacher.yaml"
DATA = "cifar10:../shared/data/cifar10"
VIEWS = 10
RANDAUGMENT = "2,9"  # RandAugment(num_ops=2, magnitude=9): torchvision's and MobileCLIP's defaults
# the caches the sweep's variants read: name → extra `mmkd cache` flags
CACHES: dict[str, list[str]] = {"cache-k10": ["--hflip"], "cache-k10-ra": ["--hflip", "--randaugment", RANDAUGMENT]}


def repo_relative(arg: str) -> str:
    """An absolute path as a path relative to the repository (what a bench JSON records), anything else as is."""
    return os.path.relpath(arg) if os.path.isabs(arg) and os.path.exists(arg) else arg


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def mmkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmkd.cli", *args]


def steps_per_epoch(n_images: int, batch: int) -> float:
    return n_images / batch


def schedule_steps(epochs: list[float], n_images: int, batch: int) -> list[int]:
    """Steps of each schedule: ``epochs`` passes over the training subset, rounded to whole steps."""
    return [max(1, round(e * steps_per_epoch(n_images, batch))) for e in epochs]


def teacher_folder(path: Path) -> Path:
    """Train the teacher when ``path`` holds no saved model: into path's parent when it is a run's ``student``."""
    if (path / "config.json").is_file():
        return path
    out = path.parent if path.name == "student" else path
    run(mmkd("distill", TEACHER_CONFIG, f"out={out}", "--resume-or-start"))
    return out / "student" if (out / "student" / "config.json").is_file() else out


def teacher_top1(model: Path, work: Path) -> dict[str, Any]:
    """The teacher's zero-shot result on the test images (kept in WORK/teacher_zeroshot.json once measured)."""
    done = work / "teacher_zeroshot.json"
    if done.is_file():
        return json.loads(done.read_text())
    text = run(mmkd("eval", "zeroshot", "--model", str(model), "--data", DATA, "--split", "test"),
               capture_output=True, text=True).stdout
    result = json.loads(text[text.index("{"):])["zeroshot"]
    done.write_text(json.dumps(result) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="the teacher's saved model folder (trained when absent)")
    ap.add_argument("--seeds", default="3", help="seeds per setting (mmkd sweep --seeds)")
    ap.add_argument("--epochs", default="2,8,30", help="schedule lengths in epochs of the training subset")
    ap.add_argument("--images", type=int, default=5000, help="training subset: the first N images (data.limit)")
    ap.add_argument("--batch", type=int, default=128, help="data.batch_size")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;…",
                    help="an extra setting in every schedule's sweep (overrides on the config)")
    ap.add_argument("--cache", action="append", default=[], metavar="NAME:FLAGS",
                    help="an extra cache to build, e.g. 'cache-k10-s035:--hflip --crop-scale 0.35,1'")
    ap.add_argument("--work", default="runs/reinforce_cifar", help="where the caches and sweeps go")
    ap.add_argument("--json", default="bench/results/reinforce_cifar.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    model = Path(repo_relative(str(teacher_folder(Path(args.teacher)).resolve())))
    phases["teacher"] = time.perf_counter() - t0
    t = time.perf_counter()
    teacher = teacher_top1(model, work)
    phases["teacher eval"] = time.perf_counter() - t
    data = [f"data.limit={args.images}", f"data.batch_size={args.batch}"]
    caches = dict(CACHES, **{c.split(":", 1)[0]: shlex.split(c.split(":", 1)[1]) for c in args.cache})
    # the caches must hold the training subset: built from the same (derived) config as the sweeps
    config = sweep_config(args.variant, work, work, {"limit": args.images, "batch_size": args.batch})
    for name, flags in caches.items():
        t = time.perf_counter()
        # a finished cache is a no-op to rebuild (every segment is committed); a killed one resumes
        run(mmkd("cache", "--config", str(config), "--teacher", str(model), "--out", str(work / name), "--views",
                 str(VIEWS), "--threads", "1", *flags))
        phases[f"cache {name}"] = time.perf_counter() - t
    epochs = [float(e) for e in args.epochs.split(",")]
    steps = schedule_steps(epochs, args.images, args.batch)
    schedules: dict[str, Any] = {}
    for e, s in zip(epochs, steps):
        t = time.perf_counter()
        out = work / f"steps-{s}"
        run(mmkd("sweep", str(config), "--seeds", args.seeds, "--out", str(out), f"train.steps={s}",
                 f"train.warmup_steps={min(10, max(1, s // 10))}", *data))
        phases[f"sweep {s} steps"] = time.perf_counter() - t
        schedules[str(s)] = {"epochs": e, "steps": s,
                             "leaderboard": json.loads((out / "leaderboard.json").read_text())}
        write(args, teacher, model, caches, schedules, phases, t0)
    write(args, teacher, model, caches, schedules, phases, t0)
    for s in schedules:
        md = work / f"steps-{s}" / "leaderboard.md"
        if md.is_file():
            print(f"## {s} steps\n{md.read_text()}")
    print(f"phases (s): { {k: round(v, 1) for k, v in phases.items()} }; total {time.perf_counter() - t0:.0f} s")
    print(f"wrote {args.json}")


def sweep_config(variants: list[str], out: Path, work: Path, data: dict[str, Any] | None = None) -> Path:
    """CONFIG, with its caches moved to ``work``, ``data`` keys set and the ``--variant`` settings added to its grid,
    written to ``out/sweep.yaml`` (CONFIG itself when nothing changes it)."""
    import yaml

    text = Path(CONFIG).read_text().replace(f"cache:{DEFAULT_WORK}/", f"cache:{work}/")
    base = yaml.safe_load(Path(CONFIG).read_text())
    changed = {k: v for k, v in (data or {}).items() if base["data"].get(k) != v}
    if not variants and work == DEFAULT_WORK and not changed:
        return Path(CONFIG)
    config = yaml.safe_load(text)
    config["data"].update(changed)
    for v in variants:
        name, _, sets = v.partition(":")
        overrides = dict(kv.split("=", 1) for kv in sets.split(";")) if sets else {}
        config["sweep"]["variants"][name] = {k: yaml.safe_load(val) for k, val in overrides.items()}
        config["sweep"]["grid"]["setting"].append(name)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write(args: argparse.Namespace, teacher: dict[str, Any], model: Path, caches: dict[str, list[str]],
          schedules: dict[str, Any], phases: dict[str, float], t0: float) -> None:
    """The study so far (after every schedule, so a stopped study keeps what it measured)."""
    from mmkd.teacher.cache import cache_size

    out = {
        "command": shlex.join(["python", "bench/reinforce_cifar.py", *map(repo_relative, sys.argv[1:])]),
        "config": CONFIG, "teacher": {"model": str(model), "zeroshot": teacher},
        "images": args.images, "batch_size": args.batch, "views": VIEWS,
        "steps_per_epoch": round(steps_per_epoch(args.images, args.batch), 2),
        "seconds": round(time.perf_counter() - t0, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "caches": {name: {"flags": flags, **cache_size(Path(args.work) / name).to_json()}
                   for name, flags in caches.items()},
        "schedules": schedules,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
