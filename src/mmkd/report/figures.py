"""The report's charts, each rendered to PNG bytes (embedded in the HTML page, written beside the Markdown)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:  # collect reads demo_report, which draws with this module: a type-only import
    from mmkd.report.collect import Curve


DPI = 100
COLOURS = matplotlib.colormaps["tab10"].colors


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], layout: str | None = None,
             **kw: Any) -> tuple[Figure, Any]:
    """A figure outside pyplot: no global backend to set at import, nothing to close (it is garbage collected)."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, **kw)


def png(fig: Any, dpi: int = DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def grouped_bars(title: str, groups: Sequence[str], series: Mapping[str, Sequence[float | None]],
                 ylabel: str = "%", scale: float = 100.0, ylim: tuple[float, float] | None = (0, 100)) -> bytes:
    """One group of bars per metric, one bar per model; missing values are left out (no zero bar)."""
    width_in = min(10.0, 2.5 + 1.1 * len(groups) * (0.6 + 0.25 * len(series)))
    fig, ax = subplots(figsize=(max(5.5, width_in), 3.4))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        ys = [scale * v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=label, color=COLOURS[i % len(COLOURS)])
        if len(series) * len(groups) <= 24:
            ax.bar_label(bars, fmt="%.1f" if scale == 100 else "%.3g", fontsize=7, padding=1)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], list(groups))
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(ylim[0], ylim[1] * 1.08)  # headroom for the value labels
        ax.set_yticks([t for t in ax.get_yticks() if ylim[0] <= t <= ylim[1]])
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return png(fig)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x: lower is better, y: higher is better).

    Sorted by x. A point is dominated when another has x <= and y >= with at least one strict; exact
    duplicates are all kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = -math.inf
    for i in order:
        x, y = points[i]
        if y > best_y or (front and points[front[-1]] == (x, y)):
            front.append(i)
            best_y = max(best_y, y)
    return front


def pareto_chart(labels: Sequence[str], latency_ms: Sequence[float], accuracy: Sequence[float],
                 ylabel: str) -> bytes:
    """Accuracy against per-image latency (log x); the Pareto front is the line of models worth choosing."""
    fig, ax = subplots(figsize=(7, 4))
    pts = list(zip(latency_ms, accuracy))
    front = pareto_front(pts)
    ax.step([pts[i][0] for i in front], [100 * pts[i][1] for i in front], where="post", color="0.5", lw=1.2,
            ls="--", label="Pareto front", zorder=1)
    for i, (label, (x, y)) in enumerate(zip(labels, pts)):
        on = i in front
        ax.scatter([x], [100 * y], s=70 if on else 45, color=COLOURS[i % len(COLOURS)], zorder=3,
                   edgecolor="black" if on else "none", label=label)
        ax.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms per image, batch 1, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title("Accuracy against latency (up and to the left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return png(fig)


def curves_chart(curves: Sequence[Curve]) -> bytes:
    """Training loss per run (log y) and, where the loop logged evaluations, those too."""
    with_evals = [c for c in curves if c.evals]
    n = 2 if with_evals else 1
    fig, axes = subplots(1, n, figsize=(6 * n, 3.6), squeeze=False)
    ax = axes[0][0]
    for i, c in enumerate(curves):
        if c.loss:
            ax.plot(*zip(*c.loss), label=c.label, color=COLOURS[i % len(COLOURS)])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if with_evals:
        ax = axes[0][1]
        for i, c in enumerate(curves):
            if not c.evals:
                continue
            keys = sorted({k for _, e in c.evals for k in e})
            for k in keys:
                pts = [(s, 100 * e[k]) for s, e in c.evals if k in e]
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"{c.label}: {k}", color=COLOURS[i % len(COLOURS)])
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.set_title("evaluations during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def _heat(ax: Any, mat: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, cmap: str,
          vmin: float, vmax: float, show_rows: bool) -> Any:
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows if show_rows else [""] * len(rows), fontsize=7)
    ax.set_title(title, fontsize=9)
    return im


def bias_heatmaps(bias: Mapping[str, Any], kind: str, labels: Mapping[str, str]) -> bytes:
    """Cosine maps [gender terms × professions] per model (top row) and each model minus the reference."""
    models = [n for n, e in bias["models"].items() if kind in e]
    ref = bias.get("reference")
    others = [n for n in models if n != ref and n in bias.get("vs_reference", {})]
    mats = {n: np.asarray(bias["models"][n][kind]["cosine"]) for n in models}
    rows = bias["models"][models[0]][kind]["rows"]
    cols = bias["models"][models[0]][kind]["professions"]
    ncols = max(len(models), len(others))
    nrows = 2 if others else 1
    h = 0.2 * len(rows) + 1.5  # rows of cells + the rotated profession labels
    fig, axes = subplots(nrows, ncols, figsize=(3.4 * ncols + 1.2, h * nrows + 0.5), squeeze=False,
                             layout="constrained")
    lo = min(float(m.min()) for m in mats.values())
    hi = max(float(m.max()) for m in mats.values())
    im = None
    for j, n in enumerate(models):
        im = _heat(axes[0][j], mats[n], rows, cols, labels.get(n, n), "viridis", lo, hi, j == 0)
    for j in range(len(models), ncols):
        axes[0][j].axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, pad=0.01, aspect=10, label="cosine")
    if others:
        deltas = {n: mats[n] - mats[ref] for n in others}
        lim = max(1e-6, max(float(np.abs(d).max()) for d in deltas.values()))
        dim = None
        for j, n in enumerate(others):
            dim = _heat(axes[1][j], deltas[n], rows, cols, f"{labels.get(n, n)} − {labels.get(ref, ref)}",
                        "RdBu_r", -lim, lim, j == 0)
        for j in range(len(others), ncols):
            axes[1][j].axis("off")
        fig.colorbar(dim, ax=axes[1].tolist(), fraction=0.02, pad=0.01, aspect=10, label="Δ cosine")
    fig.suptitle(f"Bias probe ({kind}): cosine of gender terms and professions", fontsize=10)
    return png(fig)


def bias_scores_chart(bias: Mapping[str, Any], kind: str, labels: Mapping[str, str]) -> bytes:
    """Per-profession gender score (mean cosine to female terms minus to male terms), one bar per model."""
    models = [n for n, e in bias["models"].items() if kind in e]
    profs = bias["models"][models[0]][kind]["professions"]
    fig, ax = subplots(figsize=(7.5, 0.28 * len(profs) * max(1, len(models)) ** 0.5 + 1.5))
    height = 0.8 / len(models)
    for i, n in enumerate(models):
        scores = bias["models"][n][kind]["gender_score"]
        ax.barh([j + i * height for j in range(len(profs))], scores, height, label=labels.get(n, n),
                color=COLOURS[i % len(COLOURS)])
    ax.set_yticks([j + height * (len(models) - 1) / 2 for j in range(len(profs))], profs, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("gender score: ← closer to male terms | closer to female terms →")
    ax.set_title(f"Bias probe ({kind}): gender score per profession")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return png(fig)


def efficiency_chart(labels: Sequence[str], params_m: Sequence[float | None], gflops: Sequence[float | None],
                     latency_ms: Sequence[float | None]) -> bytes:
    """Size, compute and speed side by side (one panel each: their units differ)."""
    panels = [("parameters (M)", params_m), ("GFLOPs per image", gflops), ("ms per image (batch 1)", latency_ms)]
    panels = [(t, v) for t, v in panels if any(x is not None for x in v)]
    fig, axes = subplots(1, len(panels), figsize=(3.3 * len(panels) + 0.5, 3.2), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        xs = [i for i, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [values[i] for i in xs], color=[COLOURS[i % len(COLOURS)] for i in xs])
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
        ax.set_xticks(range(len(labels)), list(labels), rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return png(fig)
