"""The sweep's leaderboard: one row per run plus the teacher and the from-scratch references.

Written as ``leaderboard.md`` (what a person reads), ``leaderboard.csv`` (every metric, for a notebook),
``leaderboard.png`` (zero-shot top-1/top-5, retrieval R@1 and train time per run) and ``leaderboard.json`` (the
rows, notes and the command, from which ``mmkd readme`` renders the README's copy).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mmkd.eval.tasks import spec_data
from mmkd.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from mmkd.report.figures import png, subplots


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


def leaderboard_rows(sweep: Any, teacher: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Teacher first, then runs by zero-shot top-1 (best first); each student row gets Δ top-1 vs the
    scratch run with the same task objectives and config-axis values (else the sweep's scratch reference)."""
    runs = []
    for run in sweep.runs:
        metrics = json.loads((Path(run.cfg.out) / "metrics.json").read_text())
        objectives = [{"name": o.name, "weight": o.weight, "towers": o.towers, "params": o.params}
                      for o in run.cfg.objectives]
        row = _row(run.name, run.role, _objectives_text(objectives), run.axes, metrics)
        row["_ref"] = run.reference
        runs.append(row)
    scratch = {r["_ref"]: r for r in runs if r["role"] == "scratch"}
    for r in runs:
        ref = scratch.get(r["_ref"])
        r["vs_scratch"] = ref["run"] if ref is not None and ref is not r else ""
        r["d_top1"] = (r["zs_top1"] - ref["zs_top1"] if ref is not None and ref is not r
                       and r["zs_top1"] is not None and ref["zs_top1"] is not None else None)
    runs.sort(key=lambda r: -(r["zs_top1"] if r["zs_top1"] is not None else -1.0))
    for r in runs:
        r.pop("_ref")
    rows = []
    if teacher is not None:
        rows.append(_row("teacher", "teacher", teacher.get("teacher", ""), {}, teacher))
    return rows + runs


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    head = ("| run | role | objectives | zero-shot top-1 % | top-5 % | Δ top-1 vs scratch (pts) | "
            "i2t R@1 % | t2i R@1 % | train s |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "" if r.get("d_top1") is None else f"{100 * r['d_top1']:+.1f}"
        train = "" if r.get("train_s") is None else f"{r['train_s']:.0f}"
        lines.append(f"| {r['run']} | {r['role']} | {r['objectives']} | {_pct(r['zs_top1'])} | "
                     f"{_pct(r['zs_top5'])} | {delta} | {_pct(r['i2t_r1'])} | {_pct(r['t2i_r1'])} | {train} |")
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
        ax.barh(range(len(names)), values, color=colours)
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


def write_leaderboard(sweep: Any, teacher: dict[str, Any] | None) -> Path:
    rows = leaderboard_rows(sweep, teacher)
    first = sweep.runs[0].cfg
    zs = next((e for e in first.eval if e.kind == "zeroshot"), None)
    rt = next((e for e in first.eval if e.kind == "retrieval"), None)
    def where(e: Any) -> str:
        extra = [x for x in (e.class_set, e.split and f"split {e.split}", e.limit and f"first {e.limit}") if x]
        return spec_data(e) + (f" ({', '.join(extra)})" if extra else "")

    notes = (f"Zero-shot: {where(zs)}; " if zs else "") + (f"retrieval: {where(rt)}; " if rt else "") + (
        f"teacher: {first.teacher}. Train time is student time only (teacher targets computed once per sweep).")
    atomic_write_text(sweep.out / "leaderboard.md", markdown(rows, f"# Leaderboard: {sweep.out}\n\n{notes}"))
    atomic_write_json(sweep.out / "leaderboard.json", {"command": sweep.command, "notes": notes,
                                                       "rows": rows})
    write_csv(rows, sweep.out / "leaderboard.csv")
    plot(rows, sweep.out / "leaderboard.png")
    return sweep.out / "leaderboard.md"
