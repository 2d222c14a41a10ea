"""The sweep's leaderboard: one row per grid point plus the teacher and the from-scratch references.

Written as ``leaderboard.md`` (what a person reads), ``leaderboard.csv`` (every metric, for a notebook),
``leaderboard.png`` (zero-shot top-1/top-5, retrieval R@1 and train time per grid point) and ``leaderboard.json``
(the rows, notes and the command, from which ``make readme`` renders the docs' copy). A grid point run with
several seeds shows each metric's mean ± sd over them; every row has a bootstrap interval of zero-shot top-1
over test images and every distilled row says whether its Δ vs scratch is beyond noise (``mmkd.report.noise``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.eval.perimage import read_per_image
from mmkd.eval.tasks import spec_data
from mmkd.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from mmkd.report.figures import png, subplots
from mmkd.report.noise import beyond_noise, bootstrap_interval, mean_sd, per_image_rate


def _first(evals: dict[str, Any], kind: str) -> tuple[str | None, dict[str, Any]]:
    for name, value in evals.items():
        if kind == "zeroshot" and "top1" in value:
            return name, value
        if kind == "retrieval" and "i2t_r1" in value:
            return name, value
    return None, {}


def _row(name: str, role: str, objectives: str, axes: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    evals = metrics.get("eval", {})
    _, zs = _first(evals, "zeroshot")
    _, rt = _first(evals, "retrieval")
    row: dict[str, Any] = {"run": name, "role": role, "objectives": objectives,
                           **{f"axis:{k}": v for k, v in axes.items()},
                           "zs_top1": zs.get("top1"), "zs_top5": zs.get("top5"),
                           "i2t_r1": rt.get("i2t_r1"), "t2i_r1": rt.get("t2i_r1"),
                           "train_s": metrics.get("train", {}).get("seconds")}
    for ev, values in evals.items():
        for k, v in values.items():
            row[f"{ev}/{k}"] = v
    return row


def _objectives_text(objectives: list[dict[str, Any]]) -> str:
    parts = []
    for o in objectives:
        text = o["name"]
        if o.get("towers") and sorted(o["towers"]) != ["image", "text"]:
            text += f"[{','.join(o['towers'])}]"
        if o.get("weight", 1.0) != 1.0:
            text = f"{o['weight']:g}·{text}"
        parts.append(text)
    return " + ".join(parts)


METRICS = ("zs_top1", "zs_top5", "i2t_r1", "t2i_r1", "train_s")


def _hits(folder: Path, metrics: dict[str, Any]) -> np.ndarray | None:
    """The run's per-image top-1 correctness on the zero-shot entry the board shows (None: not stored)."""
    name, _ = _first(metrics.get("eval", {}), "zeroshot")
    return read_per_image(folder).get(name) if name else None


def _aggregate(point: str, members: list[tuple[Any, dict[str, Any], np.ndarray | None]]) -> dict[str, Any]:
    """One row per grid point: every numeric metric's mean over its seeds, and its sd (``KEY_sd``)."""
    first_run, first_row, _ = members[0]
    row: dict[str, Any] = {"run": point, "role": first_row["role"], "objectives": first_row["objectives"],
                           "seeds": len(members), "seed_list": " ".join(str(m[0].seed) for m in members),
                           **{k: v for k, v in first_row.items() if k.startswith("axis:")}}
    keys: list[str] = list(METRICS)  # (always present, None where a run has no such evaluation)
    for _, r, _ in members:
        keys += [k for k, v in r.items() if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k in keys:
        mean, sd = mean_sd([r.get(k) for _, r, _ in members])
        row[k] = mean
        if len(members) > 1:  # (one seed: the columns of a one-seed board, no empty sd columns)
            row[f"{k}_sd"] = sd
    rate = per_image_rate([h for _, _, h in members])
    row["zs_top1_lo"], row["zs_top1_hi"] = bootstrap_interval(rate) if rate is not None else (None, None)
    row["_rate"] = rate
    return row


def leaderboard_rows(sweep: Any, teacher: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Teacher first, then one row per grid point (its seeds averaged) by zero-shot top-1 (best first).

    Each student row gets Δ top-1 vs the scratch run with the same task objectives, config-axis values and seed
    (or, where the sweep names a ``baseline`` grid point, vs that point's run of the same seed): mean and sd over
    seeds (``d_top1``/``d_top1_sd``), its paired bootstrap interval over test images (``d_top1_lo``/``_hi``)
    and ``beyond_noise`` (see :func:`mmkd.report.noise.beyond_noise`)."""
    per_run = []
    for run in sweep.runs:
        folder = Path(run.cfg.out)
        metrics = json.loads((folder / "metrics.json").read_text())
        objectives = [{"name": o.name, "weight": o.weight, "towers": o.towers, "params": o.params}
                      for o in run.cfg.objectives]
        per_run.append((run, _row(run.name, run.role, _objectives_text(objectives), run.axes, metrics),
                        _hits(folder, metrics)))
    baseline = getattr(sweep, "baseline", None)
    if baseline is not None:  # every row against the baseline grid point's run of the same seed
        by_seed = {run.seed: (run, row) for run, row, _ in per_run if run.point == baseline}
    scratch = {run.reference: (run, row) for run, row, _ in per_run if run.role == "scratch"}
    groups: dict[str, list[tuple[Any, dict[str, Any], np.ndarray | None]]] = {}
    for run, row, hits in per_run:
        ref = by_seed.get(run.seed) if baseline is not None else scratch.get(run.reference)
        row["_ref_point"] = ref[0].point or ref[0].name if ref is not None and ref[0] is not run else ""
        row["d_top1"] = (row["zs_top1"] - ref[1]["zs_top1"] if row["_ref_point"] and ref is not None
                         and row["zs_top1"] is not None and ref[1]["zs_top1"] is not None else None)
        groups.setdefault(run.point or run.name, []).append((run, row, hits))
    rows = {point: _aggregate(point, members) for point, members in groups.items()}
    for point, members in groups.items():
        r = rows[point]
        refs = {m[1]["_ref_point"] for m in members}
        ref_point = refs.pop() if len(refs) == 1 else ""
        r["vs_scratch"] = ref_point
        ref = rows.get(ref_point)
        d_values = [m[1]["d_top1"] for m in members]
        r["d_top1"], d_sd = mean_sd(d_values) if ref is not None else (None, None)
        if r["seeds"] > 1:
            r["d_top1_sd"] = d_sd
        interval = None
        if ref is not None and r["_rate"] is not None and ref["_rate"] is not None \
                and r["_rate"].size == ref["_rate"].size and r["seeds"] == ref["seeds"]:
            interval = bootstrap_interval(r["_rate"] - ref["_rate"])
        r["d_top1_lo"], r["d_top1_hi"] = interval or (None, None)
        r["beyond_noise"] = beyond_noise(r["d_top1"], interval, r.get("zs_top1_sd"),
                                         ref.get("zs_top1_sd") if ref is not None else None)
    out = sorted(rows.values(), key=lambda r: -(r["zs_top1"] if r["zs_top1"] is not None else -1.0))
    if teacher is not None:
        t = _row("teacher", "teacher", teacher.get("teacher", ""), {}, teacher)
        rate = _hits(sweep.out / "teacher", teacher)
        t["zs_top1_lo"], t["zs_top1_hi"] = bootstrap_interval(rate.astype(np.float64)) if rate is not None \
            else (None, None)
        out.insert(0, t)
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in out]


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _spread(r: dict[str, Any], key: str, fmt: str = ".1f", mult: float = 100.0, sign: str = "") -> str:
    """``mean`` or ``mean ± sd`` (over seeds); ``–`` when missing."""
    v = r.get(key)
    if v is None:
        return "–"
    sd = r.get(f"{key}_sd")
    text = f"{mult * v:{sign}{fmt}}"
    return text if sd is None else f"{text} ± {mult * sd:{fmt}}"


def _interval(r: dict[str, Any]) -> str:
    lo, hi = r.get("zs_top1_lo"), r.get("zs_top1_hi")
    return "–" if lo is None or hi is None else f"{100 * lo:.1f}–{100 * hi:.1f}"


def markdown(rows: list[dict[str, Any]], title: str = "", versus: str = "scratch") -> str:
    """The board as a Markdown table: a ``seeds`` column only when some grid point ran more than one seed; the
    interval and noise columns only for rows written with them (a board saved before them renders as it was).
    versus: what Δ top-1 is measured against (the scratch references, or the sweep's baseline grid point)."""
    seeded = any((r.get("seeds") or 1) > 1 for r in rows)
    noisy = any("zs_top1_lo" in r for r in rows)
    cols = ["run", "role", "objectives", *(["seeds"] if seeded else []), "zero-shot top-1 %",
            *(["top-1 95% interval"] if noisy else []), "top-5 %", f"Δ top-1 vs {versus} (pts)",
            *(["beyond noise"] if noisy else []), "i2t R@1 %", "t2i R@1 %", "train s"]
    align = {"run": "---", "role": "---", "objectives": "---", "beyond noise": ":---:"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align.get(c, "---:") for c in cols) + "|"]
    for r in rows:
        cells = {"run": r["run"], "role": r["role"], "objectives": r["objectives"], "seeds": str(r.get("seeds") or ""),
                 "zero-shot top-1 %": _spread(r, "zs_top1"), "top-1 95% interval": _interval(r),
                 "top-5 %": _spread(r, "zs_top5"),
                 f"Δ top-1 vs {versus} (pts)": "" if r.get("d_top1") is None else _spread(r, "d_top1", sign="+"),
                 "beyond noise": {True: "yes", False: "no"}.get(r.get("beyond_noise"), ""),  # type: ignore[arg-type]
                 "i2t R@1 %": _spread(r, "i2t_r1"), "t2i R@1 %": _spread(r, "t2i_r1"),
                 "train s": "" if r.get("train_s") is None else _spread(r, "train_s", ".0f", 1.0)}
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    return (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    atomic_write_text(path, buf.getvalue())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    students = [r for r in rows if r["role"] != "teacher"]
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    names = [r["run"] for r in students][::-1]
    colours = ["#999999" if r["role"] == "scratch" else "#3b75af" for r in students][::-1]
    panels = [("zs_top1", "zero-shot top-1 (%)", 100), ("zs_top5", "zero-shot top-5 (%)", 100),
              ("i2t_r1", "image→text R@1 (%)", 100), ("train_s", "train time (s)", 1)]
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(names) + 1.8), sharey=True)
    for ax, (key, label, mult) in zip(axes, panels):
        values = [(r[key] or 0) * mult for r in students][::-1]
        spread = [(r.get(f"{key}_sd") or 0) * mult for r in students][::-1]
        ax.barh(range(len(names)), values, color=colours, xerr=spread if any(spread) else None, capsize=2)
        if teacher is not None and teacher.get(key) is not None and key != "train_s":
            ax.axvline(teacher[key] * mult, color="#c0392b", ls="--", lw=1.2, label="teacher")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels(names, fontsize=8)
    fig.suptitle("sweep leaderboard (grey: from-scratch references)")
    fig.tight_layout()
    atomic_write_bytes(path, png(fig, dpi=110))


def _teachers(sweep: Any) -> str:
    """The sweep's teacher, or each distinct one (a variant may change it) in grid order."""
    seen = dict.fromkeys(str(r.cfg.teacher) for r in sweep.runs if r.role != "scratch") or {
        str(sweep.runs[0].cfg.teacher): None}
    return " / ".join(seen)


def write_leaderboard(sweep: Any, teacher: dict[str, Any] | None) -> Path:
    rows = leaderboard_rows(sweep, teacher)
    first = sweep.runs[0].cfg
    zs = next((e for e in first.eval if e.kind == "zeroshot"), None)
    rt = next((e for e in first.eval if e.kind == "retrieval"), None)
    def where(e: Any) -> str:
        extra = [x for x in (e.class_set, e.split and f"split {e.split}", e.limit and f"first {e.limit}") if x]
        return spec_data(e) + (f" ({', '.join(extra)})" if extra else "")

    notes = (f"Zero-shot: {where(zs)}; " if zs else "") + (f"retrieval: {where(rt)}; " if rt else "") + (
        f"teacher: {_teachers(sweep)}. Train time is student time only (teacher targets computed once per sweep).")
    versus = getattr(sweep, "baseline", None) or "scratch"
    atomic_write_text(sweep.out / "leaderboard.md",
                      markdown(rows, f"# Leaderboard: {sweep.out}\n\n{notes}", versus=versus))
    atomic_write_json(sweep.out / "leaderboard.json", {"command": sweep.command, "notes": notes, "versus": versus,
                                                       "rows": rows})
    write_csv(rows, sweep.out / "leaderboard.csv")
    plot(rows, sweep.out / "leaderboard.png")
    return sweep.out / "leaderboard.md"
