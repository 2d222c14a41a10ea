"""The README's student-families section: the leaderboard of ``configs/families/world.yaml`` with each image tower's
CPU latency and the accuracy–latency Pareto front, and the int8 teacher cache's cost and effect on KD.

Input: ``bench/results/student_families.json`` (``bench/student_families.py``: the sweep's rows, latencies, the
caches' bytes per sample), and the figure it draws beside it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from readme_sections.core import SECTIONS, read_json

HOW = ("run `nice -n 10 python bench/student_families.py --teacher runs/demo/teacher` (about 45 minutes on a loaded "
       "2-core machine)")


def _top1(r: dict[str, Any]) -> str:
    sd = r.get("zs_top1_sd")
    return f"{100 * r['zs_top1']:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _delta(r: dict[str, Any]) -> str:
    d = r.get("d_top1")
    if d is None:
        return "—"
    lo, hi = r.get("d_top1_lo"), r.get("d_top1_hi")
    spread = f" ({100 * lo:+.1f} to {100 * hi:+.1f})" if lo is not None and hi is not None else ""
    return f"{100 * d:+.1f}{spread}" + (" beyond noise" if r.get("beyond_noise") else "")


@SECTIONS.register("student-families")
def student_families_section(root: Path) -> str:
    r = read_json(root / "bench" / "results" / "student_families.json", "student-families", HOW)
    rows, lat = r["rows"], r["latency"]
    seeds = max((x.get("seeds") or 1) for x in rows) if rows else 0
    train_s = sum((x.get("train_s") or 0) * (x.get("seeds") or 1) for x in rows)
    out = [textwrap.fill(f"From `bench/results/student_families.json`, written by `{r['command']}` (the sweep: "
                         f"`{r['sweep_command']}`, {len(rows)} grid points × {seeds} seeds, {train_s / 60:.0f} minutes "
                         f"of student training; schedule and recipe: `configs/families/world.yaml`; the last call "
                         f"took {r['seconds'] / 60:.0f} minutes, skipping the steps already done). {r['notes']}", 115),
           "",
           f"| student image tower | vision params | ms per image¹ | zero-shot top-1 (%) | Δ top-1 vs "
           f"`{r.get('versus')}` (paired 95% interval) | Pareto front |", "|---|---:|---:|---:|---|:---:|"]
    for x in rows:
        t = lat.get(x["run"], {})
        out.append(f"| `{x['run']}` ({t.get('model_type', '?')}) | {t.get('params_vision', 0):,} | "
                   f"{t.get('ms', float('nan')):.2f} | {_top1(x)} | {_delta(x)} | "
                   f"{'yes' if x['run'] in r['pareto'] else ''} |")
    out += ["", textwrap.fill("¹ `encode_image` of the trained student, one 32-pixel image, one CPU thread, median "
                              "of interleaved rounds (so a load change hits every model alike); `_int8` rows share "
                              "their tower with the row without it and are left out of the front.", 115), "",
            f"![accuracy–latency Pareto figure](bench/results/{Path(r['figure']).name})"]
    tz = r.get("teacher_zeroshot")
    if tz:
        who = "`configs/families/teacher.yaml`" if r.get("teacher_command") else f"`--teacher`, `{r.get('teacher')}`"
        out += ["", textwrap.fill(f"The teacher ({who}) on the same test images: zero-shot "
                                  f"top-1 {100 * tz['top1']:.1f}%, top-5 {100 * tz['top5']:.1f}%.", 115)]
    q8 = r.get("int8_vs_float16")
    if q8 and q8.get("per_seed"):
        out += ["", textwrap.fill(_int8_text(q8), 115)]
    sizes = r.get("cache_sizes") or {}
    if {"float16", "int8"} <= set(sizes):
        h, q = sizes["float16"], sizes["int8"]
        out += ["", textwrap.fill(
            f"The same teacher's caches (`cache_size`): float16 {h['embedding_bytes_per_sample']:,.0f} bytes per "
            f"sample in embedding arrays, int8 {q['embedding_bytes_per_sample']:,.0f} "
            f"({q['embedding_bytes_per_sample'] / h['embedding_bytes_per_sample']:.3f}×).", 115)]
    return "\n".join(out)


def _int8_text(q: dict[str, Any]) -> str:
    """KD from the int8 cache vs float16's, paired by seed, against the issue's bound and the sweep's noise rule."""
    seeds = ", ".join(f"seed {k} {100 * v:+.2f}" for k, v in q["per_seed"].items())
    lo, hi = q.get("interval") or (None, None)
    noise = (f"; by the sweep's noise rule the pair is {'beyond' if q.get('beyond_noise') else 'within'} noise"
             + (f" (paired 95% interval over test images {100 * lo:+.1f} to {100 * hi:+.1f} points)"
                if lo is not None and hi is not None else ""))
    bound = 100 * q["bound"]
    verdict = ("every seed and the mean" if q["every_seed_within_bound"] else
               "the mean but not every seed" if q["mean_within_bound"] else "not the mean")
    return (f"KD from the int8 cache minus KD from the float16 cache (`tower-vit_int8` − `tower-vit`, same student, "
            f"seeds and batches), zero-shot top-1 points: {seeds}; mean {100 * q['mean']:+.2f}. Within "
            f"{bound:.1f} points: {verdict}{noise}.")


@SECTIONS.register("cache-int8")
def cache_int8_section(root: Path) -> str:
    """The bytes-per-sample table of float16 and int8 teacher caches: bytes, the training step's cost of reading
    each (``bench/cache_cost.py``, demo teacher) and KD top-1 from each (the families sweep's ViT, 3 seeds)."""
    res = root / "bench" / "results"
    fam = read_json(res / "student_families.json", "cache-int8", HOW)
    cost = {"float16": read_json(res / "cache_cost.json", "cache-int8", "run `python bench/cache_cost.py --json "
                                 "bench/results/cache_cost.json`"),
            "int8": read_json(res / "cache_cost_int8.json", "cache-int8", "run `python bench/cache_cost.py "
                              "--teachers demo --dtype int8 --json bench/results/cache_cost_int8.json`")}
    sizes, rows = fam["cache_sizes"], {x["run"]: x for x in fam["rows"]}
    base = sizes["float16"]["embedding_bytes_per_sample"]
    out = ["| teacher cache | embedding bytes per sample¹ | × float16 | cached / plain step time² | KD zero-shot "
           "top-1 (%)³ |", "|---|---:|---:|---:|---:|"]
    for dtype, run in (("float16", "tower-vit"), ("int8", "tower-vit_int8")):
        b = sizes[dtype]["embedding_bytes_per_sample"]
        out.append(f"| {dtype} | {b:,.0f} | {b / base:.3f} | {cost[dtype]['demo_cached_over_plain_time']:.3f} | "
                   f"{_top1(rows[run]) if run in rows else '—'} |")
    d = {k: cost[k]["details"] for k in cost}
    notes = [f"¹ `cache_size` of the float16 and int8 caches that `{fam['command']}` built of one teacher "
             f"({sizes['float16']['n_samples']:,} samples × {sizes['float16'].get('views', 1)} view(s)).",
             "² Median training step reading the cache over a plain step, the demo-shaped teacher, batch 64, "
             + "; ".join(f"{k}: `python bench/cache_cost.py{'' if k == 'float16' else ' --teachers demo --dtype int8'}"
                         f"` ({v['steps']} timed steps, {v['repeats']} alternating processes)" for k, v in d.items())
             + " (target ≤ 1.05).",
             f"³ Mean ± sd over {rows.get('tower-vit', {}).get('seeds', '?')} seeds, the families sweep's ViT student "
             "trained from each cache (the student-families leaderboard)."]
    q8 = fam.get("int8_vs_float16")
    kd = ["", textwrap.fill(_int8_text(q8), 115)] if q8 and q8.get("per_seed") else []
    return "\n".join(out + [""] + [textwrap.fill(n, 115) for n in notes] + kd)
