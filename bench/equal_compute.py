"""The teacher cache's worth at equal compute (issue 21 item 2): zero-shot top-1 against training time and samples.

Three students of the demo (``configs/demo/``), the same architecture, data, objectives, steps and seed:
(a) ``scratch``: no teacher (scratch.yaml); (b) ``online``: the teacher runs at every step on the augmented views
the student sees (student.yaml with ``data.augment: true, augment_paired: false``: a fresh random-resized crop +
flip of each uncaptioned image at every step); (c) ``cached``: the teacher's embeddings read from a cache of K views
per image built once beforehand (student_cached.yaml; the same augmentation, views replayed exactly). Each student
is evaluated every ``--eval-every`` steps on held-out single-object *validation* images (the world's ``val`` split,
never the test images): colour+shape zero-shot top-1, as the demo reports. The evaluation runs inside the training
loop (``run_distill(curve=...)``) and its time is left out of the training clock (``time_s``/``cpu_s`` in each run's
metrics.jsonl). Each run is a fresh process; the runs of a seed go one after another (cached, online, scratch),
seeds alternate the order, so a change of the machine's load falls on every mode.

What it answers: the step (and training seconds) at which the cached student first reaches the online student's
final accuracy, as a fraction of the online student's training time; that fraction with the cache's build time
added; and the same fraction for a ViT-B/16-shaped teacher, from the per-step times ``bench/cache_cost.py`` measured
(``bench/results/cache_cost.json``: online over cached step time) applied to the steps measured here.

Usage: python bench/equal_compute.py [--steps 400] [--eval-every 50] [--val 1000] [--views 2] [--seeds 0,1,2]
       [--teacher-steps 600] [--teacher DIR] [--work runs/equal_compute] [--json PATH] [--png PATH]
       [--teacher-override KEY=VALUE] [--override KEY=VALUE] [--from-json PATH (summary and figure only)]
Full study: python bench/equal_compute.py --seeds 0,1,2 --json bench/results/equal_compute.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
MODES = ("cached", "online", "scratch")
CONFIG = {"cached": "student_cached.yaml", "online": "student.yaml", "scratch": "scratch.yaml"}


# ------------------------------------------------------------------------------------------------- analysis


def first_reaching(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point of ``curve`` (sorted by step) whose top-1 is at least ``target``; None when none is."""
    return next((p for p in curve if p["top1"] >= target), None)


def summarise(runs: dict[str, list[dict[str, Any]]], cache_build_s: float, b16_online_over_cached: float | None
              ) -> dict[str, Any]:
    """Per seed: where the cached student reaches the online one's final top-1, in steps and in training seconds
    (without and with the cache's build), and the B/16 fraction from measured step times; then the medians."""
    per_seed = []
    for online, cached in zip(runs["online"], runs["cached"]):
        target = online["curve"][-1]["top1"]
        hit = first_reaching(cached["curve"], target)
        online_s = online["curve"][-1]["time_s"]
        row: dict[str, Any] = {"seed": online["seed"], "online_final_top1": target,
                               "cached_final_top1": cached["curve"][-1]["top1"],
                               "online_s": online_s, "cached_s": cached["curve"][-1]["time_s"],
                               "reached": hit is not None,
                               "equal_steps_time_fraction": cached["curve"][-1]["time_s"] / online_s,
                               "equal_steps_cpu_fraction": cached["curve"][-1]["cpu_s"] / online["curve"][-1]["cpu_s"]}
        if hit is not None:
            row["reached_at_step"] = hit["step"]
            row["time_fraction"] = hit["time_s"] / online_s
            row["time_fraction_with_build"] = (hit["time_s"] + cache_build_s) / online_s
            row["cpu_fraction"] = hit["cpu_s"] / online["curve"][-1]["cpu_s"]
            if b16_online_over_cached:  # the cached step is the student's own; online pays the teacher on top
                row["b16_time_fraction"] = hit["step"] / online["curve"][-1]["step"] / b16_online_over_cached
        per_seed.append(row)
    out: dict[str, Any] = {"per_seed": per_seed}
    for key in ("time_fraction", "time_fraction_with_build", "cpu_fraction", "b16_time_fraction",
                "equal_steps_time_fraction", "equal_steps_cpu_fraction"):
        vals = [r[key] for r in per_seed if key in r]
        if vals and len(vals) == len(per_seed):
            out[key] = statistics.median(vals)
    return out


# ------------------------------------------------------------------------------------------------- one run


def run_config(mode: str, args: argparse.Namespace, seed: int, teacher: Path, cache: Path) -> Any:
    from mmkd.config import load_config

    over = [f"out={Path(args.work) / f'seed{seed}' / mode}", f"cache_dir={Path(args.work) / 'cache'}",
            f"train.steps={args.steps}", f"train.ckpt_every={args.steps}", f"train.seed={seed}",
            f"teacher={f'cache:{cache}' if mode == 'cached' else teacher}"]
    if mode == "online":
        over += ["data.augment=true", "data.augment_paired=false"]
    if args.threads:
        over.append(f"train.threads={args.threads}")
    return load_config(DEMO / CONFIG[mode], over + list(args.override))


def val_scorer(args: argparse.Namespace) -> Any:
    """colour+shape zero-shot top-1 on the world's validation split (single-object images; never the test's)."""
    from mmkd.data import world
    from mmkd.eval.suite import world_labels, zeroshot

    val = world.to_records(world.load_split("val", args.val, Path(args.work) / "cache" / "world"))
    names, templates = world.class_sets()["colour_shape"], world.templates("colour_shape")
    labels = world_labels(val, "colour_shape")

    def curve(model: Any) -> dict[str, Any]:
        return {"top1": zeroshot(model, val, names, templates, labels)["top1"]}

    return curve


def teacher_val_top1(teacher: Path, args: argparse.Namespace) -> float:
    from mmkd.models.hub import load_dual_encoder

    return float(val_scorer(args)(load_dual_encoder(teacher).eval())["top1"])


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one mode with a zero-shot curve; the curve's clock is the training loop's (evaluation left out)."""
    from mmkd.fileio import read_jsonl
    from mmkd.pipeline import run_distill

    cfg = run_config(args.mode, args, args.seed, Path(args.teacher), Path(args.cache))
    curve = val_scorer(args)

    run_distill(cfg, progress=False, log=lambda *_: None, overwrite=True, curve=curve, curve_every=args.eval_every)
    points = [{"step": r["step"], "time_s": r["time_s"], "cpu_s": r["cpu_s"], "eval_s": r["eval_s"],
               "top1": r["eval"]["top1"]} for _, r in read_jsonl(Path(cfg.out) / "metrics.jsonl", "metrics")
              if "eval" in r]
    per_step = cfg.data.batch_size + (cfg.data.unpaired_batch_size if cfg.data.unpaired else 0)
    for p in points:
        p["samples"] = p["step"] * per_step
    return {"mode": args.mode, "seed": args.seed, "samples_per_step": per_step, "curve": points}


# ------------------------------------------------------------------------------------------------- the study


def teacher_and_cache(args: argparse.Namespace, log: Any) -> tuple[Path, Path, float]:
    """The demo teacher (shortened by --teacher-steps, or --teacher DIR) and its K-view cache; the build's time."""
    from mmkd.config import load_config
    from mmkd.demo import DemoSettings, build_teacher_cache
    from mmkd.models.hub import load_dual_encoder
    from mmkd.pipeline import run_distill

    work = Path(args.work)
    if args.teacher:
        teacher = Path(args.teacher)
    else:
        cfg = load_config(DEMO / "teacher.yaml", [f"out={work / 'teacher'}", f"cache_dir={work / 'cache'}",
                                                   f"train.steps={args.teacher_steps}", *args.teacher_override])
        teacher = work / "teacher" / "student"
        if not (work / "teacher" / "metrics.json").is_file():
            log(f"training the demo teacher for {args.teacher_steps} steps → {cfg.out}")
            run_distill(cfg, progress=False, log=log, overwrite=True)
    cached_cfg = run_config("cached", args, 0, teacher, work / "cache" / "none")
    folder = work / "cache" / f"teacher-cache-k{args.views}"
    t0 = time.perf_counter()
    settings = DemoSettings(cache_views=args.views, cache_augmentation={})  # the online student's augmentation
    build_teacher_cache(cached_cfg, load_dual_encoder(teacher), str(teacher), folder, settings, log)
    return teacher, folder, time.perf_counter() - t0


def study(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    teacher, cache, build_s = teacher_and_cache(args, print)
    print(f"cache: {args.views} views per image, built in {build_s:.1f} s")
    teacher_top1 = teacher_val_top1(teacher, args)
    run = teacher.parent / "metrics.json"  # a teacher trained by mmkd: its run folder says how long
    teacher_steps = json.loads(run.read_text())["train"]["steps"] if run.is_file() else None
    print(f"teacher: {teacher} ({teacher_steps} steps), colour+shape top-1 on val {teacher_top1:.3f}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i, seed in enumerate(args.seeds):
        order = MODES[i % 3:] + MODES[:i % 3]  # rotate the order from seed to seed
        for mode in order:
            cmd = [sys.executable, __file__, "--worker", mode, "--seed", str(seed), "--teacher", str(teacher),
                   "--cache", str(cache), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--val", str(args.val), "--work", args.work, "--threads", str(args.threads or 0)]
            cmd += [f"--override={o}" for o in args.override]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{mode} (seed {seed}) failed:\n{done.stderr[-3000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            last = res["curve"][-1]
            print(f"seed {seed} {mode:8s} top-1 {last['top1']:.3f} after {last['step']} steps, "
                  f"{last['time_s']:.1f} s training ({last['cpu_s']:.1f} CPU s)")
            runs[mode].append(res)
    cost = ROOT / "bench" / "results" / "cache_cost.json"
    b16 = json.loads(cost.read_text()).get("online_over_cached_time") if cost.is_file() else None
    summary = summarise(runs, build_s, b16)
    return {"summary": summary, "runs": runs,
            "details": {"steps": args.steps, "eval_every": args.eval_every, "val_images": args.val,
                        "views": args.views, "seeds": args.seeds, "cache_build_s": round(build_s, 1),
                        "teacher": str(teacher), "teacher_steps": teacher_steps, "teacher_top1": teacher_top1,
                        "overrides": args.override, "b16_online_over_cached_time": b16,
                        "b16_source": "bench/results/cache_cost.json", "seconds": round(time.perf_counter() - t_start)}}


def plot(result: dict[str, Any], path: Path) -> None:
    """Top-1 against training seconds and against samples seen, one line per mode and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {"scratch": "tab:gray", "online": "tab:blue", "cached": "tab:orange"}
    build = result["details"]["cache_build_s"]
    for mode, runs in result["runs"].items():
        for i, run in enumerate(runs):
            c = run["curve"]
            label = mode if i == 0 else None
            axes[0].plot([p["time_s"] for p in c], [100 * p["top1"] for p in c], "o-", color=colours[mode],
                         label=label, ms=3)
            if mode == "cached" and i == 0:
                axes[0].plot([p["time_s"] + build for p in c], [100 * p["top1"] for p in c], "o--",
                             color=colours[mode], alpha=0.5, ms=3, label="cached + cache build")
            axes[1].plot([p["samples"] for p in c], [100 * p["top1"] for p in c], "o-", color=colours[mode],
                         label=label, ms=3)
    for ax in axes:
        ax.axhline(100 * result["details"]["teacher_top1"], color="k", ls=":", lw=1, label="teacher")
    axes[0].set_xlabel("training wall-clock (s, evaluation excluded)")
    axes[1].set_xlabel("images seen by the student")
    for ax in axes:
        ax.set_ylabel("colour+shape zero-shot top-1 (%, val)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--teacher", default="", help="a trained teacher's model folder (skips training one)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="key=value for every student's config")
    ap.add_argument("--teacher-override", action="append", default=[], help="key=value for the teacher's config")
    ap.add_argument("--work", default="runs/equal_compute")
    ap.add_argument("--json", default="")
    ap.add_argument("--png", default="bench/results/equal_compute.png")
    ap.add_argument("--from-json", default="", help="recompute the summary and figure of a finished study's JSON")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return
    if args.from_json:  # summary and figure again from a finished study's JSON (no training)
        result = json.loads(Path(args.from_json).read_text())
        d = result["details"]
        result["summary"] = summarise(result["runs"], d["cache_build_s"], d["b16_online_over_cached_time"])
    else:
        result = study(args)
    s = result["summary"]
    for key in ("time_fraction", "time_fraction_with_build", "cpu_fraction", "b16_time_fraction",
                "equal_steps_time_fraction", "equal_steps_cpu_fraction"):
        if key in s:
            print(f"{key}: {s[key]:.3f}")
    if not all(r["reached"] for r in s["per_seed"]):
        print("the cached student did not reach the online student's final top-1 in some seed(s)")
    plot(result, Path(args.png))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"equal_compute: {result['details']['seconds']} s")


if __name__ == "__main__":
    main()
