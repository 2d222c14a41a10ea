"""The docs' "Which recipe to start with" block: every shipped recipe on the built-in world and on CIFAR-10, with the
rows that answer "keep the task loss?" and "inherit the teacher's weights?", from ``bench/results/recipes.json``
(``bench/recipes.py``). The sentences under the tables are generated from the numbers, by the noise rule of
``mmkd sweep --seeds``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from readme_sections.core import SECTIONS, read_json

HOW = "run `python bench/recipes.py --seeds 3` (see its docstring for the teachers it takes)"
TITLES = {"world": "Built-in world (colour+shape zero-shot top-1 on world:test)",
          "cifar10": "CIFAR-10 (zero-shot top-1 on the test shard)"}


def _pm(mean: float | None, sd: float | None, sign: str = "") -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:{sign}.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _interval(r: dict[str, Any]) -> str:
    lo, hi = r.get("d_top1_lo"), r.get("d_top1_hi")
    return f"{100 * lo:+.1f} to {100 * hi:+.1f}" if lo is not None and hi is not None else "–"


def _noise(value: bool | None) -> str:
    return {True: "yes", False: "no"}.get(value, "–")  # type: ignore[arg-type]


def table(d: dict[str, Any]) -> list[str]:
    """One data set's rows: top-1, Δ vs scratch, the noise verdict and the cost per step."""
    out = ["| row | what it changes from scratch | top-1 % | Δ vs scratch (pts) | paired 95% interval | beyond noise "
           "| ms/step as run | ms/step, teacher every step |", "|---|---|---:|---:|---:|:---:|---:|---:|"]
    for name, r in d["rows"].items():
        if name == "teacher":
            continue
        online = r.get("step_cpu_ms_teacher_online")
        vs = ["", "", ""] if name == "scratch" else [_pm(r.get("d_top1"), r.get("d_top1_sd"), "+"), _interval(r),
                                                      _noise(r.get("beyond_noise"))]
        cells = [f"`{name}`", r["changes"], _pm(r["zs_top1"], r.get("zs_top1_sd")), *vs, f"{r['step_cpu_ms']:.0f}",
                 f"{online:.0f}" if online is not None else ""]
        out.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    return out


def verdicts(d: dict[str, Any]) -> list[str]:
    """Generated sentences: the best row, and the two users' questions answered by their paired comparisons."""
    rows = {k: v for k, v in d["rows"].items() if k != "teacher"}
    best = max((k for k in rows if k != "scratch"), key=lambda k: rows[k]["zs_top1"])
    gain = [k for k in rows if k != "scratch" and rows[k].get("beyond_noise") and rows[k]["d_top1"] > 0]
    loss = [k for k in rows if k != "scratch" and rows[k].get("beyond_noise") and rows[k]["d_top1"] < 0]
    teacher = (d["rows"].get("teacher") or {}).get("zs_top1")
    kept = f", {100 * rows[best]['zs_top1'] / teacher:.0f}% of the teacher's" if teacher else ""
    out = [f"Best: `{best}` ({_pm(rows[best]['zs_top1'], rows[best].get('zs_top1_sd'))}%{kept}). Beyond noise above "
           f"scratch: {', '.join(f'`{k}`' for k in gain) or 'none'}; below it: "
           f"{', '.join(f'`{k}`' for k in loss) or 'none'}."]
    question = {"clip-kd-no-task": "Keep the task loss", "tinyclip-no-inherit": "Inherit the teacher's weights"}
    for p in d.get("pairs") or []:
        verdict = ("beyond noise" if p["beyond_noise"] else "within noise") if p["beyond_noise"] is not None else \
            "noise not testable"
        out.append(f"{question.get(p['b'], p['b'])}? `{p['a']}` − `{p['b']}`: "
                   f"{_pm(p['d_top1'], p.get('d_top1_sd'), '+')} points (paired 95% interval {_interval(p)}), "
                   f"{verdict}.")
    steps = [r["step_cpu_ms"] for r in rows.values()]
    tf = d.get("teacher_forward") or {}
    if tf.get("cpu_ms") and "scratch" in rows:
        out.append(f"Cost: as run, every row's step takes {min(steps):.0f}–{max(steps):.0f} ms (the teacher's targets "
                   f"are tabled once, or read from the cache); the teacher's forward pass on a batch of {tf['batch']} "
                   f"takes {tf['cpu_ms']:.0f} ms, {tf['cpu_ms'] / rows['scratch']['step_cpu_ms']:.1f}× the scratch "
                   "step, which a recipe pays at every step where the teacher must run online.")
    return out


def _build_time(build: dict[str, Any]) -> str:
    wall = f"{build.get('wall_s', 0):.0f} s wall"
    return f"{build['cpu_s']:.0f} CPU s ({wall})" if build.get("cpu_s") is not None else wall


@SECTIONS.register("recipes")
def recipes_section(root: Path) -> str:
    r = read_json(root / "bench" / "results" / "recipes.json", "recipes", HOW)
    out = [textwrap.fill(f"From `bench/results/recipes.json`, written by `{r['command']}` ({r['seeds']} seeds per "
                         f"row, one thread per run, {r['train_s'] / 60:.0f} minutes of student training). Top-1 and Δ"
                         " are mean ± sample sd over seeds; Δ is paired with scratch seed by seed. ms/step is the "
                         "median training CPU time per step at one thread; the last column adds the teacher's forward "
                         "pass on one batch, for the rows that run a teacher (mmkd computes an unaugmented "
                         "teacher's targets once, so as run they pay it once, not per step).", 115,
                         break_on_hyphens=False)]
    for name, d in r["datasets"].items():
        data = d["data"]
        size = data.get("world_size_train") or data.get("limit")
        teacher = d["rows"].get("teacher", {}).get("zs_top1")
        build = d.get("cache_build") or {}
        out += ["", f"**{TITLES.get(name, name)}**", "", textwrap.fill(
            f"Teacher `{d['teacher']}`: {_pm(teacher, None)}%. Students: a {d['student_vision']['num_hidden_layers']}"
            f"-layer ViT of width {d['student_vision']['hidden_size']} (patch {d['student_vision']['patch_size']}); "
            f"inheriting rows keep the teacher's layers {d['inherit_layers']}. {d['steps']} steps of "
            f"{data['batch_size']} from {size:,} training images, lr 1e-3. mobileclip's {r['views']}-view cache was "
            f"built once in {_build_time(build)}.", 115, break_on_hyphens=False), "", *table(d), ""]
        out += [textwrap.fill(v, 113, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)
                for v in verdicts(d)]
    return "\n".join(out)
