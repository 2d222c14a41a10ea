"""``mmkd report``: one self-contained HTML page (charts embedded as base64 PNG) plus the same in Markdown.

Sections: the comparison table, a bar chart per benchmark, accuracy against latency with the Pareto front,
size and speed, training curves from each run's metrics.jsonl, and the bias probe (summary table, heatmaps,
per-profession gender scores). Every figure and table has a stable id (``fig-…``, ``table-…``) so tests and
readers can find them.
"""

from __future__ import annotations

import base64
import html
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd.fileio import atomic_write_bytes
from mmkd.report import figures
from mmkd.report.collect import ModelEntry, ReportData, load_runs

Fmt = Callable[[Any], str]


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(digits: int) -> Fmt:
    return lambda v: "–" if v is None else f"{v:.{digits}f}"


def _sig(v: Any) -> str:
    return "–" if v is None else f"{v:.3g}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


@dataclass
class Column:
    header: str
    values: list[Any]
    fmt: Fmt = _pct
    better: str | None = "high"  # "high", "low" or None: which value is bold


@dataclass
class Table:
    id: str
    title: str
    rows: list[str]  # row labels (first column)
    columns: list[Column]
    note: str = ""

    def best(self, col: Column) -> set[int]:
        vals = [(i, v) for i, v in enumerate(col.values) if isinstance(v, (int, float))]
        if col.better is None or len(vals) < 2:
            return set()
        target = (max if col.better == "high" else min)(v for _, v in vals)
        return {i for i, v in vals if v == target}


@dataclass
class Figure:
    id: str
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    items: list[Table | Figure] = field(default_factory=list)


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]

    @property
    def figures(self) -> list[Figure]:
        return [i for s in self.sections for i in s.items if isinstance(i, Figure)]

    @property
    def tables(self) -> list[Table]:
        return [i for s in self.sections for i in s.items if isinstance(i, Table)]


# ------------------------------------------------------------------------------------------ building blocks


def _get(m: ModelEntry, *path: str) -> Any:
    node: Any = m.metrics
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def comparison_table(data: ReportData) -> Table:
    models = data.models
    zs, rt = data.benchmarks("zeroshot"), data.benchmarks("retrieval")
    cols: list[Column] = [Column("params (M)", [_get(m, "params") and _get(m, "params") / 1e6 for m in models],
                                 _num(2), "low")]
    for name in zs:
        cols.append(Column(f"{name} top-1", [_get(m, "zeroshot", name, "top1") for m in models]))
        if len(zs) <= 2 and any(_get(m, "zeroshot", name, "top5") is not None for m in models):
            cols.append(Column(f"{name} top-5", [_get(m, "zeroshot", name, "top5") for m in models]))
    for name in rt:
        cols.append(Column(f"{name} I→T R@1", [_get(m, "retrieval", name, "i2t_r1") for m in models]))
        cols.append(Column(f"{name} T→I R@1", [_get(m, "retrieval", name, "t2i_r1") for m in models]))
    lat = [_get(m, "latency_ms_per_image") for m in models]
    if any(v is not None for v in lat):
        cols.append(Column("ms / image", lat, _num(3), "low"))
    ref = data.reference()
    if ref is not None:
        r_lat = _get(ref, "latency_ms_per_image")
        if r_lat:
            cols.append(Column("× faster than teacher", [r_lat / v if v else None for v in lat], _num(1), None))
        # one definition everywhere (the demo's table and the README too): the headline set's top-1 ratio, never
        # an average that easy sets (the world's colour, solved by every model) would lift
        ref_top1 = _get(ref, "zeroshot", zs[0], "top1") if zs else None
        kept = [_get(m, "zeroshot", zs[0], "top1") / ref_top1 if ref_top1 and
                _get(m, "zeroshot", zs[0], "top1") is not None else None for m in models]
        if any(k is not None for k in kept):
            cols.append(Column(f"kept of teacher ({zs[0]} top-1)", kept,
                               lambda v: "–" if v is None else f"{100 * v:.1f}%", None))
    note = ("Accuracies in %" + ("; top-5 of each set in its chart below" if len(zs) > 2 else "") +
            (f". \"kept of teacher\": {zs[0]} zero-shot top-1 relative to the teacher's" if zs else "") +
            ". Best value per column in bold.")
    trained_on = [f"{m.label} on {n} ({c.get('images')} of {c.get('of_images')} images)" for m in models
                  for n, c in (_get(m, "eval_overlap") or {}).items() if isinstance(c, dict)]
    if trained_on:
        note += " Not held out (the run trained on these images): " + "; ".join(trained_on) + "."
    return Table("table-comparison", "Comparison", [m.label for m in models], cols, note)


def efficiency_table(data: ReportData, front: set[str]) -> Table | None:
    models = data.models
    spec: list[tuple[str, tuple[str, ...], Fmt, str | None, float]] = [
        ("image tower (M params)", ("params_per_tower", "image"), _num(2), "low", 1e-6),
        ("text tower (M params)", ("params_per_tower", "text"), _num(2), "low", 1e-6),
        ("GFLOPs / image", ("flops", "image_gflops"), _sig, "low", 1.0),
        ("GFLOPs / caption", ("flops", "text_gflops"), _sig, "low", 1.0),
        ("ms / image (b1)", ("latency", "latency_ms_per_image"), _num(3), "low", 1.0),
        ("ms / caption (b1)", ("latency", "latency_ms_per_caption"), _num(3), "low", 1.0),
        ("images / s (b64)", ("latency", "images_per_s_b64"), _num(0), "high", 1.0),
        ("captions / s (b64)", ("latency", "captions_per_s_b64"), _num(0), "high", 1.0),
        ("peak MiB, images b64", ("peak_memory_mb", "image_b64"), _num(1), "low", 1.0),
        ("peak MiB, captions b64", ("peak_memory_mb", "caption_b64"), _num(1), "low", 1.0),
    ]
    cols = []
    for header, path, fmt, better, scale in spec:
        values = [_get(m, *path) for m in models]
        if any(v is not None for v in values):
            cols.append(Column(header, [v * scale if v is not None else None for v in values], fmt, better))
    if not cols:
        return None
    if front:
        cols.append(Column("on the Pareto front", [m.label in front for m in models],
                           lambda v: "yes" if v else "", None))
    note = ("Latency: median per item on the machine that ran the evaluation; b64 = batch of 64. Peak memory: "
            "extra memory while encoding a batch of 64, weights excluded (on CPU sampled from the resident set "
            "size, a slight under-estimate).")
    busy = [(m.label, _get(m, "latency", "cpu_load_1min"), _get(m, "latency", "cpu_count")) for m in models]
    busy = [(label, load, n) for label, load, n in busy if load is not None and n and load > n]
    if busy:
        worst = max(busy, key=lambda b: b[1] / b[2])
        note += (f" Caution: the CPU was oversubscribed while timing ({', '.join(b[0] for b in busy)}; load up to "
                 f"{worst[1]:.1f} on {worst[2]} cores), so these latencies are unreliable; measure again on a quiet "
                 "machine or with `mmkd eval efficiency --threads 1`.")
    return Table("table-efficiency", "Size, compute and speed", [m.label for m in models], cols, note)


def benchmark_figures(data: ReportData) -> list[Figure]:
    out = []
    for name in data.benchmarks("zeroshot"):
        models = [m for m in data.models if _get(m, "zeroshot", name) is not None]
        keys = [("top1", "top-1"), ("top5", "top-5"), ("mean_per_class_recall", "mean per-class recall")]
        keys = [k for k in keys if any(_get(m, "zeroshot", name, k[0]) is not None for m in models)]
        series = {m.label: [_get(m, "zeroshot", name, k) for k, _ in keys] for m in models}
        out.append(Figure(f"fig-zeroshot-{slug(name)}", f"Zero-shot: {name}",
                          figures.grouped_bars(f"Zero-shot classification: {name}", [t for _, t in keys], series)))
    for name in data.benchmarks("retrieval"):
        models = [m for m in data.models if _get(m, "retrieval", name) is not None]
        keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        keys = [k for k in keys if any(_get(m, "retrieval", name, k) is not None for m in models)]
        titles = [k.replace("i2t_r", "I→T R@").replace("t2i_r", "T→I R@") for k in keys]
        series = {m.label: [_get(m, "retrieval", name, k) for k in keys] for m in models}
        out.append(Figure(f"fig-retrieval-{slug(name)}", f"Retrieval: {name}",
                          figures.grouped_bars(f"Image–text retrieval: {name}", titles, series),
                          "I→T: an image finds one of its captions in the top k; T→I: a caption finds its image."))
    return out


def pareto(data: ReportData) -> tuple[Figure | None, set[str]]:
    """Accuracy = mean top-1 over the zero-shot sets every plotted model has; x = latency per image."""
    models = [m for m in data.models if _get(m, "latency_ms_per_image") and _get(m, "zeroshot")]
    if not models:
        return None, set()
    common = [n for n in data.benchmarks("zeroshot") if all(_get(m, "zeroshot", n, "top1") is not None
                                                             for m in models)]
    if not common:
        return None, set()
    acc = [_mean([_get(m, "zeroshot", n, "top1") for n in common]) or 0.0 for m in models]
    lat = [float(_get(m, "latency_ms_per_image")) for m in models]
    front = {models[i].label for i in figures.pareto_front(list(zip(lat, acc)))}
    ylabel = "mean zero-shot top-1 (%)" if len(common) > 1 else f"zero-shot top-1 on {common[0]} (%)"
    fig = Figure("fig-pareto", "Accuracy against latency",
                 figures.pareto_chart([m.label for m in models], lat, acc, ylabel),
                 f"Accuracy: zero-shot top-1{' averaged over ' + ', '.join(common) if len(common) > 1 else ''}. "
                 "Models on the dashed line are the Pareto front: no other model is both at least as fast and "
                 "at least as accurate (and better in one).")
    return fig, front


def bias_items(data: ReportData) -> tuple[list[Table | Figure], str]:
    items: list[Table | Figure] = []
    notes: list[str] = []
    runs = [r for r in data.runs if r.bias]
    for k, run in enumerate(runs):
        bias = run.bias or {}
        suffix = "" if k == 0 else f"-{k + 1}"
        where = f" ({run.name})" if len(runs) > 1 else ""
        labels = {m.name: m.label for m in run.models}
        names = list(bias.get("models", {}))
        kinds = [kind for kind in ("text", "image") if any(kind in e for e in bias["models"].values())]
        ref = bias.get("reference")
        cols: list[Column] = []
        for kind in kinds:
            probe = [bias["models"][n].get(kind) for n in names]
            vs = [bias.get("vs_reference", {}).get(n, {}).get(kind) for n in names]
            cols.append(Column(f"{kind}: mean |gender score|", [p and p["mean_abs_gender_score"] for p in probe],
                               _num(4), None))
            if ref:
                cols += [Column(f"{kind}: mean |Δ| vs {labels.get(ref, ref)}", [v and v["mean_abs_delta"] for v in vs],
                                _num(4), None),
                         Column(f"{kind}: max |Δ|", [v and v["max_abs_delta"] for v in vs], _num(4), None),
                         Column(f"{kind}: Spearman of gender scores", [v and v["spearman"] for v in vs], _num(3),
                                None),
                         Column(f"{kind}: same sign", [v and v["sign_agreement"] for v in vs], _pct, None),
                         Column(f"{kind}: bias strength vs {labels.get(ref, ref)} (spread-normalised)",
                                [v and v.get("normalised_strength_ratio") for v in vs], _num(2), None)]
        n_img = bias["models"][names[0]].get("image", {}).get("n_images") if names else None
        note = ("Gender score of a profession: mean cosine to the female terms minus mean cosine to the male "
                "terms (positive: closer to the female terms). Δ: the model's cosine matrix minus the reference's; "
                "Spearman: rank correlation of the per-profession gender scores with the reference's (1: the "
                "same order); bias strength: mean |gender score| relative to the reference's, each in units of its own "
                "spread of cosines (below 1: weaker bias). Prompt: \"" + bias.get("words", {}).get("template", "?")
                + "\".")
        if n_img:
            note += (f" Image probe on {bias.get('data')}: {n_img['female']} images whose captions mention only "
                     f"female words, {n_img['male']} only male words.")
        if bias.get("image_skipped"):
            note += f" Image probe skipped: {bias['image_skipped']}."
        items.append(Table(f"table-bias{suffix}", f"Bias probe summary{where}", [labels.get(n, n) for n in names],
                           cols, note))
        for kind in kinds:
            items.append(Figure(f"fig-bias-{kind}{suffix}", f"Bias heatmaps ({kind}){where}",
                                figures.bias_heatmaps(bias, kind, labels)))
            items.append(Figure(f"fig-bias-{kind}-scores{suffix}", f"Gender score per profession ({kind}){where}",
                                figures.bias_scores_chart(bias, kind, labels)))
    if runs:
        notes.append("How the teacher's gender–profession associations survive distillation "
                     "(the half-depth-CLIP study's probe).")
    return items, " ".join(notes)


def build_report(data: ReportData, title: str = "mmkd report") -> Report:
    sections: list[Section] = []
    sections.append(Section("comparison", "Comparison", "", [comparison_table(data)]))
    bench = benchmark_figures(data)
    if bench:
        sections.append(Section("benchmarks", "Benchmarks", "One chart per benchmark; higher is better.", bench))
    fig, front = pareto(data)
    eff: list[Table | Figure] = [fig] if fig else []
    table = efficiency_table(data, front)
    if table:
        eff.append(table)
    models = data.models
    params = [_get(m, "params") for m in models]
    if any(p is not None for p in params):
        eff.append(Figure("fig-efficiency", "Size, compute and speed", figures.efficiency_chart(
            [m.label for m in models], [p / 1e6 if p is not None else None for p in params],
            [_get(m, "flops", "image_gflops") for m in models], [_get(m, "latency_ms_per_image") for m in models])))
    if eff:
        sections.append(Section("efficiency", "Accuracy against cost", "", eff))
    if data.curves:
        sources = ", ".join(sorted({str(c.source.relative_to(r.path)) for r in data.runs for c in r.curves
                                    if c.source.is_relative_to(r.path)}))
        sections.append(Section("curves", "Training curves", f"From {sources}.",
                                [Figure("fig-curves", "Training curves", figures.curves_chart(data.curves))]))
    items, intro = bias_items(data)
    if items:
        sections.append(Section("bias", "Bias probe", intro, items))
    runs = ", ".join(f"{r.name} ({r.path})" for r in data.runs)
    subtitle = f"Runs: {runs}. Generated {time.strftime('%Y-%m-%d %H:%M')}."
    return Report(title, subtitle, sections)


# ------------------------------------------------------------------------------------------------ rendering

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1150px;margin:0 auto;padding:24px 32px;background:#fff;min-height:100vh}
h1{margin:0 0 4px;font-size:28px} .sub{color:#59636e;margin:0 0 16px;font-size:13px}
nav{margin:0 0 24px;font-size:14px} nav a{margin-right:14px;color:#0969da;text-decoration:none}
h2{border-bottom:1px solid #d1d9e0;padding-bottom:6px;margin-top:36px} h3{margin:22px 0 8px;font-size:16px}
table{border-collapse:collapse;font-size:13px;margin:8px 0;display:block;overflow-x:auto}
th,td{border:1px solid #d1d9e0;padding:4px 7px;text-align:right;white-space:nowrap}
th{background:#f0f3f6;white-space:normal;min-width:60px;max-width:120px;vertical-align:bottom}
td:first-child,th:first-child{text-align:left;font-weight:600}
tr:nth-child(even) td{background:#fafbfc} td.best{font-weight:700;color:#116329}
figure{margin:12px 0 24px} figure img{max-width:100%;border:1px solid #eaeef2}
figcaption,.note{color:#59636e;font-size:13px;margin-top:4px;max-width:1000px}
"""


def _cell(table: Table, col: Column, i: int, best: set[int], markdown: bool) -> str:
    text = col.fmt(col.values[i])
    if i in best and text not in ("–", ""):
        return f"**{text}**" if markdown else f'<td class="best">{html.escape(text)}</td>'
    return text if markdown else f"<td>{html.escape(text)}</td>"


def table_html(t: Table, heading: bool = True) -> str:
    best = {id(c): t.best(c) for c in t.columns}
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in t.columns)
    rows = []
    for i, label in enumerate(t.rows):
        cells = "".join(_cell(t, c, i, best[id(c)], False) for c in t.columns)
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    title = f"<h3>{html.escape(t.title)}</h3>" if heading else ""
    return (f'{title}<table id="{t.id}"><thead><tr><th>model</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{note}")


def table_markdown(t: Table, heading: bool = True) -> str:
    best = {id(c): t.best(c) for c in t.columns}
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [f"### {t.title}", ""] if heading else []
    lines += ["| model | " + " | ".join(esc(c.header) for c in t.columns) + " |",
             "|---|" + "---:|" * len(t.columns)]
    for i, label in enumerate(t.rows):
        lines.append(f"| {esc(label)} | " + " | ".join(esc(_cell(t, c, i, best[id(c)], True)) for c in t.columns)
                     + " |")
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines)


def render_html(report: Report) -> str:
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in report.sections)
    body = []
    for s in report.sections:
        body.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
        if s.intro:
            body.append(f'<p class="note">{html.escape(s.intro)}</p>')
        for item in s.items:
            if isinstance(item, Table):  # (a table titled as its section needs no heading of its own)
                body.append(table_html(item, heading=item.title != s.title))
            else:
                data = base64.b64encode(item.png).decode("ascii")
                cap = f"<figcaption>{html.escape(item.caption)}</figcaption>" if item.caption else ""
                body.append(f'<figure id="{item.id}"><img alt="{html.escape(item.title)}" '
                            f'src="data:image/png;base64,{data}">{cap}</figure>')
        body.append("</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}'
            f'</title><meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style>'
            f'</head><body><main><h1>{html.escape(report.title)}</h1><p class="sub">{html.escape(report.subtitle)}'
            f"</p><nav>{nav}</nav>{''.join(body)}</main></body></html>\n")


def render_markdown(report: Report, figure_dir: str) -> str:
    lines = [f"# {report.title}", "", report.subtitle, ""]
    for s in report.sections:
        lines += [f"## {s.title}", ""]
        if s.intro:
            lines += [s.intro, ""]
        for item in s.items:
            if isinstance(item, Table):
                lines += [table_markdown(item, heading=item.title != s.title), ""]
            else:
                lines += [f"![{item.title}]({figure_dir}/{item.id}.png)", ""]
                if item.caption:
                    lines += [f"*{item.caption}*", ""]
    return "\n".join(lines)


def write_report(run_dirs: Sequence[str | Path], out: str | Path, markdown: str | Path | None = None,
                 title: str = "mmkd report") -> Report:
    """Render ``out`` (HTML) and, if ``markdown`` is given, that Markdown file with its PNGs in
    ``<markdown stem>_files/`` beside it. Returns the report (its figures and tables)."""
    report = build_report(load_runs(list(run_dirs)), title)
    out = Path(out)
    atomic_write_bytes(out, render_html(report).encode("utf-8"))
    if markdown is not None:
        md = Path(markdown)
        fig_dir = md.parent / f"{md.stem}_files"
        for f in report.figures:
            atomic_write_bytes(fig_dir / f"{f.id}.png", f.png)
        atomic_write_bytes(md, render_markdown(report, fig_dir.name).encode("utf-8"))
    return report
