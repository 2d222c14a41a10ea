"""The teacher cache's worth at equal compute (issue 21 item 2): zero-shot top-1 against training time and samples.

Three students of the demo (``configs/demo/``), the same architecture, data, objectives, steps and seed:
(a) ``scratch``: no teacher (scratch.yaml); (b) ``online``: the teacher runs at every step on the augmented views
the student sees (student.yaml with ``data.views: null``: a fresh random-resized crop of each uncaptioned image at
every step, student.yaml's crop range, no flip); (c) ``cached``: the teacher's embeddings read from a cache of K views
per image built once beforehand (student_cached.yaml; student.yaml's K views, seed 0, replayed exactly). Each student
is evaluated every ``--eval-every`` steps on held-out single-object *validation* images (the world's ``val`` split,
never the test images): colour+shape zero-shot top-1, as the demo reports. The evaluation runs inside the training
loop (``run_distill(curve=...)``) and its time is left out of the training clock (``time_s``/``cpu_s`` in each run's
metrics.jsonl). Each run is a fresh process; the runs of a seed go one after another (cached, online, scratch),
seeds alternate the order, so a change of the machine's load falls on every mode.

What it answers: the step (and training seconds) at which the cached student first reaches the online student's
final accuracy, as a fraction of the online student's training time; that fraction with the cache's build time
added; and the same fraction for a ViT-B/16-shaped teacher, from the per-step times ``bench/cache_cost.py`` measured
(``bench/results/cache_cost.json``: online over cached step time) applied to the steps measured here.

Usage: python bench/equal_compute.py [--steps N] [--eval-every 50] [--val 1000] [--views 2] [--seeds 0,1,2]
       [--teacher-steps 800] [--teacher DIR] [--threads N] [--work runs/equal_compute] [--json PATH] [--png PATH]
       [--teacher-override KEY=VALUE] [--override KEY=VALUE] [--from-json PATH (summary and figure only)]
Full study (the demo's 800-step teacher and its students' steps, 20,000 uncaptioned images): python
bench/equal_compute.py --json bench/results/equal_compute.json; ``--teacher DIR`` reuses a demo's trained teacher.
A study stopped (or killed) is rerun with the same command: finished runs are read back (``SEED/MODE.result.json``
in --work), and the JSON is written after every seed.
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
# a control (--modes …,online_views): the online teacher on K views per image (view 0 plain, views 1…K−1 fixed
# crops; student.yaml as the demo runs it), instead of a fresh crop at every step: the cached student's kind of
# inputs with targets the teacher computes (tabled once, as K finite views allow), which separates "fresh crops
# vs K views" from "stored vs computed targets"
EXTRA_MODES = ("online_views",)
CONFIG = {"cached": "student_cached.yaml", "online": "student.yaml", "scratch": "scratch.yaml",
          "online_views": "student.yaml"}


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
    out: dict[str, Any] = {"per_seed": per_seed, **spread(runs)}
    for key in ("time_fraction", "time_fraction_with_build", "cpu_fraction", "b16_time_fraction",
                "equal_steps_time_fraction", "equal_steps_cpu_fraction"):
        vals = [r[key] for r in per_seed if key in r]
        if vals and len(vals) == len(per_seed):
            out[key] = statistics.median(vals)
    return out


def mean_sd(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def spread(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each mode's final top-1 over seeds (mean, sample sd) and the paired differences that answer the study:
    cached − online (does replaying K views lose accuracy?) and each distilled mode − scratch, with the noise
    rule of ``mmkd sweep --seeds``: |mean Δ| beyond sqrt(sd_a² + sd_b²) (None with one seed)."""
    from mmkd.report.noise import beyond_noise

    finals = {m: [r["curve"][-1]["top1"] for r in rs] for m, rs in runs.items() if rs}
    out: dict[str, Any] = {"final_top1": {m: mean_sd(v) for m, v in finals.items()}, "deltas": {}}
    for a, b in (("cached", "online"), ("online", "scratch"), ("cached", "scratch"), ("online_views", "online"),
                 ("cached", "online_views")):
        if a in finals and b in finals and len(finals[a]) == len(finals[b]):
            d = mean_sd([x - y for x, y in zip(finals[a], finals[b])])
            sa, sb = out["final_top1"][a]["sd"], out["final_top1"][b]["sd"]
            d["beyond_noise"] = beyond_noise(d["mean"], None, sa, sb)
            out["deltas"][f"{a}-{b}"] = d
    return out


# ------------------------------------------------------------------------------------------------- one run


def run_config(mode: str, args: argparse.Namespace, seed: int, teacher: Path, cache: Path) -> Any:
    from mmkd.config import load_config
    from mmkd.demo import inherit_from_folder

    over = [f"out={Path(args.work) / f'seed{seed}' / mode}", f"cache_dir={Path(args.work) / 'cache'}",
            f"train.steps={args.steps}", f"train.ckpt_every={args.steps}", f"train.seed={seed}",
            f"teacher={f'cache:{cache}' if mode == 'cached' else teacher}"]
    if mode in ("online", "online_views"):  # student.yaml's augmentation: its crop range, uncaptioned images only
        over += ["data.augment=true", "data.augment_paired=false"]
    if mode == "online":  # a fresh crop at every step, so the teacher runs at every step
        over.append("data.views=null")
    elif mode in ("online_views", "cached"):  # K views per image, as the cache holds them
        over.append(f"data.views={args.views}")
    if args.threads:
        over.append(f"train.threads={args.threads}")
    cfg = load_config(DEMO / CONFIG[mode], over + list(args.override))
    # a cache holds no weights: the cached student inherits the ViT layers from the teacher's folder, as the demo's
    return inherit_from_folder(cfg, str(teacher)) if mode == "cached" else cfg


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


def teacher_and_cache(args: argparse.Namespace, log: Any) -> tuple[Path, Path, dict[str, Any]]:
    """The demo teacher (shortened by --teacher-steps, or --teacher DIR) and its K-view cache; the build's wall-clock
    and CPU seconds (``seconds``, ``cpu_s``), with the students' --threads."""
    from mmkd.config import load_config
    from mmkd.demo import build_teacher_cache
    from mmkd.models.hub import load_dual_encoder
    from mmkd.pipeline import run_distill

    work = Path(args.work)
    if args.teacher:
        teacher = Path(args.teacher).resolve()  # a link's target: its run folder (metrics.json) is beside it
    else:
        cfg = load_config(DEMO / "teacher.yaml", [f"out={work / 'teacher'}", f"cache_dir={work / 'cache'}",
                                                   f"train.steps={args.teacher_steps}", *args.teacher_override])
        teacher = work / "teacher" / "student"
        if not (work / "teacher" / "metrics.json").is_file():
            log(f"training the demo teacher for {args.teacher_steps} steps → {cfg.out}")
            run_distill(cfg, progress=False, log=log, overwrite=True)
    views_cfg = run_config("online_views", args, 0, teacher, work / "cache" / "none")  # the views the cache holds
    folder = work / "cache" / f"teacher-cache-k{args.views}"
    timing = folder.parent / f"{folder.name}.build.json"  # a rerun finds the cache built: keep the first build's time
    if timing.is_file() and folder.is_dir() and json.loads(timing.read_text())["teacher"] == str(teacher):
        return teacher, folder, json.loads(timing.read_text())
    t0, c0 = time.perf_counter(), time.process_time()
    build_teacher_cache(views_cfg, load_dual_encoder(teacher), str(teacher), folder, args.views, log)
    build = {"teacher": str(teacher), "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
             "threads": args.threads}
    timing.write_text(json.dumps(build) + "\n")
    return teacher, folder, build


def study(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    if args.threads:  # the teacher's training and the cache's build too, as each student's run (train.threads)
        import torch

        torch.set_num_threads(args.threads)
    teacher, cache, build = teacher_and_cache(args, print)
    build_s = float(build["seconds"])
    print(f"cache: {args.views} views per image, built in {build_s:.1f} s ({build.get('cpu_s')} CPU s)")
    teacher_top1 = teacher_val_top1(teacher, args)
    run = teacher.parent / "metrics.json"  # a teacher trained by mmkd: its run folder says how long
    teacher_steps = json.loads(run.read_text())["train"]["steps"] if run.is_file() else None
    print(f"teacher: {teacher} ({teacher_steps} steps), colour+shape top-1 on val {teacher_top1:.3f}")
    cost = ROOT / "bench" / "results" / "cache_cost.json"
    b16 = json.loads(cost.read_text()).get("online_over_cached_time") if cost.is_file() else None
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    result: dict[str, Any] = {}
    for i, seed in enumerate(args.seeds):
        k = i % len(args.modes)
        order = args.modes[k:] + args.modes[:k]  # rotate the order from seed to seed
        for mode in order:
            res = one_run(mode, seed, teacher, cache, args)
            last = res["curve"][-1]
            print(f"seed {seed} {mode:8s} top-1 {last['top1']:.3f} after {last['step']} steps, "
                  f"{last['time_s']:.1f} s training ({last['cpu_s']:.1f} CPU s)", flush=True)
            runs[mode].append(res)
        result = {"summary": summarise(runs, build_s, b16), "runs": runs,
                  "details": {"steps": args.steps, "eval_every": args.eval_every, "val_images": args.val,
                              "views": args.views, "seeds": args.seeds[:i + 1], "cache_build_s": round(build_s, 1),
                              "cache_build_cpu_s": build.get("cpu_s"), "threads": args.threads,
                              "teacher": str(teacher), "teacher_steps": teacher_steps, "teacher_top1": teacher_top1,
                              "overrides": args.override, "b16_online_over_cached_time": b16,
                              "b16_source": "bench/results/cache_cost.json",
                              "seconds": round(time.perf_counter() - t_start)}}
        if args.json:  # after every seed: a study stopped for time keeps the seeds it finished
            write_json(result, Path(args.json))
    return result


def run_key(mode: str, seed: int, teacher: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What a finished run's curve depends on: a rerun of the study reuses a run whose key matches."""
    return {"mode": mode, "seed": seed, "teacher": str(teacher), "cache": str(cache), "steps": args.steps,
            "eval_every": args.eval_every, "val": args.val, "threads": args.threads, "overrides": list(args.override)}


def one_run(mode: str, seed: int, teacher: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One student in a fresh process, its result kept beside its run folder; a finished run with the same key
    is read back instead of trained again (a study stopped for time resumes where it was)."""
    key = run_key(mode, seed, teacher, cache, args)
    saved = Path(args.work) / f"seed{seed}" / f"{mode}.result.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("key") == key:
            return old["result"]
    cmd = [sys.executable, __file__, "--worker", mode, "--seed", str(seed), "--teacher", str(teacher),
           "--cache", str(cache), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--val", str(args.val), "--work", args.work, "--threads", str(args.threads or 0)]
    cmd += [f"--override={o}" for o in args.override]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    write_json({"key": key, "result": res}, saved)  # atomically: a study killed while writing keeps the old file
    return res


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def plot(result: dict[str, Any], path: Path) -> None:
    """Top-1 against training wall-clock, CPU seconds (the figure to read on a loaded machine) and samples seen,
    one line per mode and seed; the first cached run also shifted by the cache's build."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    colours = {"scratch": "tab:gray", "online": "tab:blue", "cached": "tab:orange", "online_views": "tab:green"}
    d = result["details"]
    build = {"time_s": d["cache_build_s"], "cpu_s": d.get("cache_build_cpu_s") or d["cache_build_s"]}
    for mode, runs in result["runs"].items():
        for i, run in enumerate(runs):
            c, label = run["curve"], mode if i == 0 else None
            top1 = [100 * p["top1"] for p in c]
            for ax, key in zip(axes, ("time_s", "cpu_s", "samples")):
                ax.plot([p[key] for p in c], top1, "o-", color=colours[mode], label=label, ms=3)
                if mode == "cached" and i == 0 and key in build:
                    ax.plot([p[key] + build[key] for p in c], top1, "o--", color=colours[mode], alpha=0.5, ms=3,
                            label="cached + cache build")
    for ax, xlabel in zip(axes, ("training wall-clock (s, evaluation excluded)", "training CPU seconds",
                                 "images seen by the student")):
        ax.axhline(100 * d["teacher_top1"], color="k", ls=":", lw=1, label="teacher")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("colour+shape zero-shot top-1 (%, val)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def modes_arg(text: str) -> list[str]:
    """--modes: cached and online (the study's question), plus any of scratch and the online_views control."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if set(modes) - set(MODES + EXTRA_MODES) or not {"cached", "online"} <= set(modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"takes cached and online, plus any of scratch, online_views, each once; got "
                                         f"{text!r}")
    return modes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="the students' steps (default: student.yaml's)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--teacher-steps", type=int, default=800)  # the demo teacher's
    ap.add_argument("--teacher", default="", help="a trained teacher's model folder (skips training one)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="key=value for every student's config")
    ap.add_argument("--teacher-override", action="append", default=[], help="key=value for the teacher's config")
    ap.add_argument("--work", default="runs/equal_compute")
    ap.add_argument("--json", default="")
    ap.add_argument("--png", default="bench/results/equal_compute.png")
    ap.add_argument("--from-json", default="", help="recompute the summary and figure of a finished study's JSON")
    ap.add_argument("--modes", type=modes_arg, default=list(MODES),
                    help=f"students to train, in order (default {','.join(MODES)}; control: online_views)")
    ap.add_argument("--worker", choices=MODES + EXTRA_MODES, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.steps:  # the demo students' own
        from mmkd.config import load_config

        args.steps = load_config(DEMO / "student.yaml").train.steps
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
        write_json(result, Path(args.json))
    print(f"equal_compute: {result['details']['seconds']} s")


if __name__ == "__main__":
    main()
