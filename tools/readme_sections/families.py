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

HOW = "run `nice -n 10 python bench/student_families.py` (about 40 minutes on a loaded 2-core machine)"


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
                         f"of student training; a short schedule, see `configs/families/world.yaml`; the last call "
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
        out += ["", textwrap.fill(f"The teacher (`configs/families/teacher.yaml`) on the same test images: zero-shot "
                                  f"top-1 {100 * tz['top1']:.1f}%, top-5 {100 * tz['top5']:.1f}%.", 115)]
    sizes = r.get("cache_sizes") or {}
    if {"float16", "int8"} <= set(sizes):
        h, q = sizes["float16"], sizes["int8"]
        out += ["", textwrap.fill(
            f"The same teacher's caches (`cache_size`): float16 {h['embedding_bytes_per_sample']:,.0f} bytes per "
            f"sample in embedding arrays, int8 {q['embedding_bytes_per_sample']:,.0f} "
            f"({q['embedding_bytes_per_sample'] / h['embedding_bytes_per_sample']:.3f}×).", 115)]
    return "\n".join(out)
