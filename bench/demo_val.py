"""The demo's choices, checked on the built-in world's *validation* split (never the test images the demo reports).

Trains the demo's teacher (configs/demo/teacher.yaml) for ``--teacher-steps`` and, from it, variants of the demo's
students for ``--student-steps`` each: a variant is ``NAME:RUN[:KEY=VALUE;KEY=VALUE…]`` with RUN one of the demo's
configs (student, scratch) and the overrides applied on top. Each model is scored by colour+shape / shape / colour
zero-shot top-1 on ``--val`` held-out single-object images of the ``val`` split (its own seed, distinct from
``test``). Shortened budgets make it fit a busy machine; the full demo's budgets are the configs' own.
``--seeds 3`` repeats everything with every run's ``train.seed`` offset by 0, 1, 2 (as ``mmkd demo --seeds``
does) and adds each model's mean ± sd; without variants it compares teachers alone.

Usage: python bench/demo_val.py [--teacher-steps 300] [--student-steps 150] [--val 1000] [--threads 1] [--seeds 1]
           [--teacher-override KEY=VALUE …] [--cache runs/demo/cache] [--out runs/demo-val] [--json PATH] [VARIANT …]
e.g.   python bench/demo_val.py student:student scratch:scratch \\
           "noinherit:student:student.vision.source=new;student.vision.arch=clip_vision;student.vision.config={…}"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mmkd.config import load_config
from mmkd.data import world
from mmkd.demo import config_key, finished, reseeded, train_run
from mmkd.eval.suite import embed_images, pixel_batches, world_labels, zeroshot_classifier, zeroshot_scores
from mmkd.models.hub import load_dual_encoder
from mmkd.run_setup import TargetCache

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
SETS = ("colour_shape", "shape", "colour")


def log(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def towers(model: Any, val: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A model's image embeddings of ``val`` and its zero-shot classifier (text embeddings) for each class set."""
    emb, _ = embed_images(model, pixel_batches(model, val))
    return emb, {cs: zeroshot_classifier(model, world.class_sets()[cs], world.templates(cs)) for cs in SETS}


def score(own: tuple, val: list, teacher: tuple | None = None) -> dict[str, float]:
    """Zero-shot top-1 per class set from a model's ``towers``; given the teacher's, also colour+shape with one tower
    swapped for the teacher's (``image_with_teacher_text``, ``text_with_teacher_image``): which of the student's
    towers falls short."""
    (emb, classifiers), labels = own, {cs: torch.tensor(world_labels(val, cs)) for cs in SETS}
    out = {cs: zeroshot_scores(emb, classifiers[cs], labels[cs])["top1"] for cs in SETS}
    if teacher is not None:
        cs = "colour_shape"
        out["image_with_teacher_text"] = zeroshot_scores(emb, teacher[1][cs], labels[cs])["top1"]
        out["text_with_teacher_image"] = zeroshot_scores(teacher[0], classifiers[cs], labels[cs])["top1"]
    return out


def seeded(a: argparse.Namespace, offset: int, cache: Path, common: list[str], val: list,
           shared: TargetCache) -> dict[str, Any]:
    """The teacher and every variant at one seed offset (every run's ``train.seed`` moved, as ``mmkd demo --seeds``
    moves them), each scored on ``val``."""
    teacher = reseeded(offset, load_config(CONFIGS / "teacher.yaml", common + [
        f"train.steps={a.teacher_steps}", f"train.ckpt_every={a.teacher_steps}", *a.teacher_override]))
    teacher = replace(teacher, out=str(cache / f"teacher-{config_key(teacher)}"))
    if not finished(teacher):
        train_run("teacher", teacher, log, None)
    teacher_dir = str(Path(teacher.out) / "student")
    teacher_towers = towers(load_dual_encoder(teacher_dir), val)
    results: dict[str, Any] = {"teacher": {"steps": a.teacher_steps, "overrides": a.teacher_override,
                                           "seed": teacher.train.seed, "val": score(teacher_towers, val)}}
    log("teacher", results["teacher"])
    for spec in a.variants:
        name, run, *rest = spec.split(":", 2)
        overrides = [o for o in (rest[0] if rest else "").split(";") if o]
        suffix = f"-s{offset}" if offset else ""
        cfg = reseeded(offset, load_config(CONFIGS / f"{run}.yaml", common + [
            f"out={Path(a.out) / f'{name}-{a.teacher_steps}-{a.student_steps}{suffix}'}",
            f"train.steps={a.student_steps}", f"train.ckpt_every={a.student_steps}", *overrides]))
        cfg = replace(cfg, teacher=teacher_dir)
        if not finished(cfg):
            train_run(name, cfg, log, shared)
        results[name] = {"run": run, "overrides": overrides, "steps": cfg.train.steps, "seed": cfg.train.seed,
                         "val": score(towers(load_dual_encoder(Path(cfg.out) / "student"), val), val,
                                      teacher_towers)}
        log(name, results[name]["val"])
    return results


def summary(per_seed: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each model's val top-1 over seeds as mean ± sd (points), and its fraction of the teacher's colour+shape."""
    names = list(next(iter(per_seed.values())))
    out: dict[str, dict[str, str]] = {}
    for name in names:
        row = {}
        for cs in SETS:
            xs = [100 * r[name]["val"][cs] for r in per_seed.values()]
            row[cs] = f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"
        kept = [100 * r[name]["val"]["colour_shape"] / r["teacher"]["val"]["colour_shape"] for r in per_seed.values()]
        row["kept_colour_shape_pct"] = f"{statistics.mean(kept):.1f} ± {statistics.stdev(kept):.1f}"
        out[name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="*")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--student-steps", type=int, default=150)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1, help="offset every run's train.seed by 0 … N-1")
    p.add_argument("--teacher-override", action="append", default=[],
                   help="KEY=VALUE applied to configs/demo/teacher.yaml (repeatable), e.g. a deeper teacher")
    p.add_argument("--cache", default="runs/demo/cache")
    p.add_argument("--out", default="runs/demo-val")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cache, common = Path(a.cache), [f"cache_dir={a.cache}", f"train.threads={a.threads}"]
    val = world.to_records(world.load_split("val", a.val, cache / "world"))
    shared = TargetCache()
    per_seed: dict[str, Any] = {}
    for offset in range(a.seeds):
        per_seed[str(offset)] = seeded(a, offset, cache, common, val, shared)
    results = per_seed["0"] if a.seeds == 1 else {"per_seed": per_seed, "mean_sd": summary(per_seed)}
    out = {"command": "python bench/demo_val.py " + " ".join(f"'{v}'" for v in a.variants)
           + f" --teacher-steps {a.teacher_steps} --student-steps {a.student_steps} --val {a.val} --threads {a.threads}"
           + (f" --seeds {a.seeds}" if a.seeds > 1 else "")
           + "".join(f" --teacher-override '{o}'" for o in a.teacher_override),
           "split": "val", "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
