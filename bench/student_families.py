"""Efficient student families on the built-in world: the leaderboard of ``configs/families/world.yaml`` with each
student's CPU latency, and the accuracy–latency Pareto figure.

Why a script: the students compare image towers of different families (a ViT against transformers' ConvNeXt,
RegNet and LeViT, ``arch: hf:<model_type>``) at a similar latency, trained by one recipe from one teacher cache,
so the teacher and its cache must exist first, and latency is measured on the trained students afterwards. Each
step is an ordinary mmkd command (printed before it runs), skipped when its output is complete:

1. the teacher: ``--teacher DIR`` (the README's figures: the demo's trained teacher), else a small one trained from
   ``configs/families/teacher.yaml``;
2. its caches over the sweep's data, float16 and int8 (``mmkd cache --config configs/families/world.yaml
   [--dtype int8]``), and their bytes per sample (``mmkd.teacher.cache.cache_size``);
3. ``mmkd sweep configs/families/world.yaml --seeds 3`` (the families from the float16 cache; the ViT student once
   more from the int8 cache: KD from int8 targets vs float16's);
4. each trained student's image-encoder latency (``encode_image``, one 32-pixel image, one thread, median of
   interleaved rounds) and parameter count; the figure ``bench/results/student_families.png``; everything in
   ``--json`` (default ``bench/results/student_families.json``) for ``make readme`` (``tools/readme.py``).

The schedule (see the config) is sized to about 45 minutes on a loaded 2-core machine.

Usage: nice -n 10 python bench/student_families.py --teacher runs/demo/teacher [--seeds 3] [--json PATH]
(writes runs/families)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

CONFIG = "configs/families/world.yaml"
WORK = Path("runs/families")
SWEEP = WORK / "sweep"
CACHES = {"float16": WORK / "cache", "int8": WORK / "cache-int8"}  # the config's teacher and its vit_int8 variant


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def mmkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmkd.cli", *args]


def students(sweep: Path) -> dict[str, list[Path]]:
    """Saved students of the sweep by grid point (the run folder's name before its seed)."""
    out: dict[str, list[Path]] = {}
    for cfg in sorted(sweep.glob("**/student/config.json")):
        run_dir = cfg.parent.parent
        point = run_dir.name.split("__seed-")[0]  # the config's own seed keeps the plain name
        out.setdefault(point, []).append(cfg.parent)
    return out


def per_seed_top1(sweep: Path) -> dict[str, dict[str, float]]:
    """Zero-shot top-1 of every run of the sweep by grid point and seed (``train.seed`` of its config)."""
    out: dict[str, dict[str, float]] = {}
    for m in sorted(sweep.glob("**/metrics.json")):
        if not (m.parent / "config.yaml").is_file():  # the sweep's teacher evaluation, not a run
            continue
        metrics = json.loads(m.read_text())
        zs = next(v for k, v in metrics["eval"].items() if k.startswith("zeroshot"))
        seed = yaml.safe_load((m.parent / "config.yaml").read_text())["train"]["seed"]
        out.setdefault(m.parent.name.split("__seed-")[0], {})[str(seed)] = zs["top1"]
    return out


def int8_vs_float16(seeds: dict[str, dict[str, float]], rows: list[dict[str, Any]], bound: float = 0.003
                    ) -> dict[str, Any]:
    """KD from the int8 cache against float16's, paired by seed (same student, seed and data order): each seed's
    difference, their mean, whether every one and the mean are within ``bound`` (the issue's 0.3 points), and the
    sweep's noise rule for the pair (paired interval over test images, spread over seeds)."""
    a, b = seeds.get("tower-vit_int8", {}), seeds.get("tower-vit", {})
    diffs = {s: a[s] - b[s] for s in sorted(a) if s in b}
    row = next((r for r in rows if r["run"] == "tower-vit_int8"), {})
    mean = statistics.mean(diffs.values()) if diffs else None
    return {"per_seed": diffs, "mean": mean, "bound": bound,
            "mean_within_bound": mean is not None and abs(mean) <= bound,
            "every_seed_within_bound": bool(diffs) and all(abs(d) <= bound for d in diffs.values()),
            "interval": [row.get("d_top1_lo"), row.get("d_top1_hi")], "beyond_noise": row.get("beyond_noise")}


def latency(folders: dict[str, Path], rounds: int = 7, reps: int = 50) -> dict[str, dict[str, float]]:
    """Median ms per image of each model's image encoder at batch 1 on one CPU thread (rounds alternate between
    models, so a load change on the machine hits every model alike)."""
    import torch

    import mmkd

    torch.set_num_threads(1)
    models = {k: mmkd.load(str(f)).eval() for k, f in folders.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(rounds):
            for k, m in models.items():
                x = torch.randn(1, 3, m.image_size, m.image_size)
                for _ in range(5):
                    m.encode_image(x)
                t = time.perf_counter()
                for _ in range(reps):
                    m.encode_image(x)
                times[k].append(1000 * (time.perf_counter() - t) / reps)
    return {k: {"ms": statistics.median(v), "ms_min": min(v),
                "params_vision": sum(p.numel() for p in models[k].vision_model.parameters()),
                "model_type": str(models[k].vision_model.config.model_type)} for k, v in times.items()}


def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both latency (lower) and top-1 (higher)."""
    return [n for n, ms, acc in points
            if not any(m2 <= ms and a2 >= acc and (m2, a2) != (ms, acc) for _, m2, a2 in points)]


def figure(rows: list[dict[str, Any]], lat: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["run"], lat[r["run"]]["ms"], 100 * r["zs_top1"]) for r in rows if r["run"] in lat
           and not r["run"].endswith("_int8")]
    front = sorted((p for p in pts if p[0] in pareto(pts)), key=lambda p: p[1])
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["run"] in lat and not r["run"].endswith("_int8"):
            ax.errorbar(lat[r["run"]]["ms"], 100 * r["zs_top1"], yerr=100 * (r.get("zs_top1_sd") or 0), fmt="o",
                        capsize=3)
            ax.annotate(r["run"].removeprefix("tower-"), (lat[r["run"]]["ms"], 100 * r["zs_top1"]),
                        textcoords="offset points", xytext=(5, 5))
    ax.plot([p[1] for p in front], [p[2] for p in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("image encoder, ms per image (batch 1, 1 CPU thread)")
    ax.set_ylabel("zero-shot top-1 (%), mean ± sd over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher", help="a trained teacher folder (default: train one under runs/families)")
    ap.add_argument("--json", default="bench/results/student_families.json")
    args = ap.parse_args()
    start = time.time()
    teacher = Path(args.teacher) if args.teacher else WORK / "teacher" / "student"
    teacher_cmd = None
    if not args.teacher:
        teacher_cmd = mmkd("distill", "configs/families/teacher.yaml", "--resume-or-start")
        if not (teacher / "config.json").is_file():
            run(teacher_cmd)
    for dtype, folder in CACHES.items():
        # fp32 teacher compute: bfloat16 (``auto``) is emulated on most CPUs, 5x slower here; the same for both
        run(mmkd("cache", "--config", CONFIG, "--teacher", str(teacher), "--out", str(folder), "--dtype", dtype,
                 "--precision", "fp32", "--batch-size", "256"))
    from mmkd.teacher.cache import cache_size

    sizes = {dtype: cache_size(folder).to_json() for dtype, folder in CACHES.items()}
    for n in range(1, args.seeds + 1):  # seed by seed (each call skips finished runs): a cut-short study is whole
        run(mmkd("sweep", CONFIG, "--seeds", str(n)))
    # the teacher's own zero-shot top-1 on the sweep's test images: the ceiling the students distil towards
    run_cfg = yaml.safe_load(Path(CONFIG).read_text())
    zs = next(e for e in run_cfg["eval"] if e["kind"] == "zeroshot")
    eval_cmd = mmkd("eval", "zeroshot", "--model", str(teacher), "--data", zs["data"], "--class-set",
                    zs["class_set"], "--limit", str(zs["limit"]), "--cache", run_cfg["cache_dir"])
    print("$ " + shlex.join(eval_cmd), flush=True)
    teacher_zs = json.loads(subprocess.run(eval_cmd, check=True, capture_output=True, text=True).stdout)["zeroshot"]
    board = json.loads((SWEEP / "leaderboard.json").read_text())
    rows = [r for r in board["rows"] if r["role"] not in ("teacher", "scratch")]
    saved = students(SWEEP)
    lat = latency({k: v[0] for k, v in saved.items()})
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = out.with_suffix(".png")
    figure(rows, lat, fig)
    pts = [(r["run"], lat[r["run"]]["ms"], r["zs_top1"]) for r in rows if r["run"] in lat
           and not r["run"].endswith("_int8")]
    seeds = per_seed_top1(SWEEP)
    result = {"teacher": str(teacher), "cache_sizes": sizes, "per_seed_top1": seeds,
              "int8_vs_float16": int8_vs_float16(seeds, rows), "teacher_zeroshot": teacher_zs,
              "command": "python " + shlex.join(sys.argv),
              "teacher_command": teacher_cmd and shlex.join(teacher_cmd),
              "sweep_command": board["command"], "notes": board["notes"], "versus": board.get("versus"),
              "rows": rows, "latency": lat, "pareto": pareto(pts), "figure": str(fig), "seconds": time.time() - start}
    out.write_text(json.dumps(result, indent=1))
    for r in rows:
        x = lat.get(r["run"], {})
        print(f"{r['run']:20s} top-1 {100 * r['zs_top1']:.1f} ± {100 * (r.get('zs_top1_sd') or 0):.1f}  "
              f"{x.get('ms', float('nan')):.2f} ms  {x.get('params_vision', 0):,} params")
    print(f"wrote {out} and {fig} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
