"""Markdown tables, CSV and a plot for matching studies, sweeps and the demo (from their JSON metrics)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmkd.fileio import atomic_write_text
from mmkd.studies.matching.metrics import confusion_table

LABELS = {"teacher": "teacher", "baseline": "baseline (BCE)", "kd_kl": "KD-KL", "kd_bce": "KD-BCE"}


def _pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


def model_table(models: dict[str, Any], split: str = "test") -> str:
    """acc / P / R / F1 / AUC per model, and each student's F1 as a share of the teacher's."""
    t_f1 = models.get("teacher", {}).get(split, {}).get("f1")
    lines = ["| model | accuracy | precision | recall | F1 | ROC-AUC | F1 kept of teacher |",
             "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        r = m[split]
        kept = "–" if name == "teacher" or not t_f1 else f"{100 * r['f1'] / t_f1:.0f}%"
        lines.append(f"| {LABELS.get(name, name)} | {_pct(r['accuracy'])} | {_pct(r['precision'])} | "
                     f"{_pct(r['recall'])} | {_pct(r['f1'])} | {_pct(r['roc_auc'])} | {kept} |")
    return "\n".join(lines)


def errors_table(errors: Sequence[dict[str, Any]], limit: int = 20) -> str:
    if not errors:
        return "(the teacher made no errors on the test split)"
    lines = ["| truth | teacher says | caption | image: its own caption (the one replaced, for a mismatch) "
             "| negative kind |",
             "|---|---|---|---|---|"]
    for e in errors[:limit]:
        truth = "match" if e["label"] else "mismatch"
        said = "match" if e["predicted"] else "mismatch"
        cap = e["caption"].replace("|", "/")
        own = (e.get("image_caption") or "").replace("|", "/")
        lines.append(f"| {truth} | {said} ({e['logit']:+.2f}) | {cap} | {e.get('image') or e['image_key']}: {own} | "
                     f"{e.get('negative') or '–'} |")
    if len(errors) > limit:
        lines.append(f"\n… and {len(errors) - limit} more in metrics.json (`teacher_errors`).")
    return "\n".join(lines)


def write_study_report(out: Path, metrics: dict[str, Any]) -> Path:
    models = metrics["models"]
    text = ["# Image–text matching study", "",
            f"Pairs: `{metrics['pairs']}` (data `{metrics['data']}`, {metrics['negatives']} negatives). "
            f"Teacher: `{metrics['teacher_source']}`. Threshold chosen on val (best accuracy), numbers on test.", "",
            model_table(models), "", "## Confusion tables (test)", ""]
    for name, m in models.items():
        text += [f"**{LABELS.get(name, name)}** (threshold {m['test']['threshold']:+.3f})", "",
                 confusion_table(m["test"]["confusion"]), ""]
    text += ["## The teacher's errors (test, most confident first)", "", errors_table(metrics["teacher_errors"]), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(text))
    return path


# ------------------------------------------------------------------------------------------------ sweep

LEADERBOARD_COLUMNS = ("rank", "model", "variant", "temperature", "alpha", "val_f1", "val_accuracy",
                       "test_accuracy", "test_precision", "test_recall", "test_f1", "test_roc_auc")


def leaderboard_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """KD runs ranked by validation F1 (then validation accuracy); references (teacher, baseline) unranked."""
    def row(r: dict[str, Any]) -> dict[str, Any]:
        kd = r.get("kd") or {}
        return {"model": r["name"], "variant": kd.get("variant", ""), "temperature": kd.get("temperature", ""),
                "alpha": kd.get("alpha", ""), "val_f1": r["val"]["f1"], "val_accuracy": r["val"]["accuracy"],
                **{f"test_{k}": r["test"][k] for k in ("accuracy", "precision", "recall", "f1", "roc_auc")}}

    kd_rows = sorted((row(r) for r in results if r.get("kd")), key=lambda x: (-x["val_f1"], -x["val_accuracy"]))
    refs = [row(r) for r in results if not r.get("kd")]
    return ([{"rank": i + 1, **r} for i, r in enumerate(kd_rows)] + [{"rank": "", **r} for r in refs])


def leaderboard_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LEADERBOARD_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) and k not in ("temperature", "alpha") else r[k])
                    for k in LEADERBOARD_COLUMNS})
    return buf.getvalue()


def leaderboard_md(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| rank | model | T | α | val F1 | test acc | test P | test R | test F1 | test AUC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {LABELS.get(r['model'], r['model'])} | {r['temperature']} | {r['alpha']} | "
                     f"{_pct(r['val_f1'])} | {_pct(r['test_accuracy'])} | {_pct(r['test_precision'])} | "
                     f"{_pct(r['test_recall'])} | {_pct(r['test_f1'])} | {_pct(r['test_roc_auc'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ demo


def demo_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows: setting × model, with acc / P / R / F1 / AUC (test)."""
    lines = ["| negatives | model | accuracy | precision | recall | F1 | ROC-AUC | F1 kept of teacher |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, models in summary.items():
        t_f1 = models["teacher"]["f1"]
        for name, r in models.items():
            kept = "–" if name == "teacher" or not t_f1 else f"{100 * r['f1'] / t_f1:.0f}%"
            lines.append(f"| {setting} | {LABELS.get(name, name)} | {_pct(r['accuracy'])} | {_pct(r['precision'])} | "
                         f"{_pct(r['recall'])} | {_pct(r['f1'])} | {_pct(r['roc_auc'])} | {kept} |")
    return "\n".join(lines)


def plot_demo(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """F1 and accuracy of each model, one group per setting."""
    settings = list(summary)
    names = list(next(iter(summary.values()))) if summary else []
    from matplotlib.figure import Figure  # no pyplot: no backend to choose, no global state

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(1, len(names))
    for ax, key in zip(axes, ("f1", "accuracy")):
        for i, name in enumerate(names):
            vals = [100 * summary[s][name][key] for s in settings]
            ax.bar([j + i * width for j in range(len(settings))], vals, width, label=LABELS.get(name, name))
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(settings))], settings)
        ax.set_ylim(0, 100)
        ax.axhline(50, color="grey", lw=0.8, ls=":")
        ax.set_title(f"test {key} (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Binary image–text matching: teacher, baseline and KD students")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------ seeds


def _mean_sd(values: Sequence[float]) -> str:
    """Mean ± sample sd in percent (just the mean for one value)."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _f1s(runs: Sequence[dict[str, Any]], model: str, transfer: int | None) -> list[float]:
    return [r["test"]["f1"] for r in runs if r["model"] == model and r["transfer"] == transfer]


def seeds_table(seeds: dict[str, Any]) -> str:
    """Test F1 mean ± sd over seeds per setting × transfer size (rows) and model (columns)."""
    models = ["baseline", *seeds["kd"]]
    lines = ["| negatives | teacher | KD students trained on | " + " | ".join(LABELS.get(m, m) for m in models) + " |",
             "|---|---|---|" + "---|" * len(models)]
    for setting, s in seeds["settings"].items():
        for t in seeds["transfer"]:
            what = "labelled pairs only (S2)" if t == 0 else f"+ {t} transfer pairs per pair"
            cells = [_mean_sd(_f1s(s["runs"], m, None if m == "baseline" else t)) for m in models]
            lines.append(f"| {setting} | {_pct(s['teacher']['f1'])} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kept(runs: Sequence[dict[str, Any]], teacher_f1: float, model: str, transfer: int | None) -> str:
    f1s = _f1s(runs, model, transfer)
    return f"{100 * sum(f1s) / len(f1s) / teacher_f1:.0f}%" if f1s and teacher_f1 else "–"


def seeds_summary(seeds: dict[str, Any]) -> list[str]:
    """Per setting: each model's mean test F1 as a share of the teacher's, with and without the transfer set."""
    out = []
    sizes = " / ".join("labelled only" if t == 0 else f"+ {t} transfer" for t in seeds["transfer"])
    for setting, s in seeds["settings"].items():
        runs, t_f1 = s["runs"], s["teacher"]["f1"]
        parts = [f"{LABELS.get(m, m)} {' / '.join(_kept(runs, t_f1, m, t) for t in seeds['transfer'])}"
                 for m in seeds["kd"]]
        out.append(f"- {setting}: mean test F1 as a share of the teacher's: baseline "
                   f"{_kept(runs, t_f1, 'baseline', None)}, {', '.join(parts)} ({sizes}).")
    return out
