"""The demo's report: a Markdown table and PNG plots built from metrics.json and metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmkd import fileio
from mmkd.report.collect import ROWS, read_jsonl
from mmkd.report.figures import png, subplots


def table_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    models = metrics["models"]
    teacher_top1 = models["teacher"]["zeroshot"]["colour_shape"]["top1"]
    t_lat = models["teacher"]["latency_ms_per_image"]
    t_lat64 = models["teacher"]["latency"]["latency_ms_per_image_b64"]
    t_flops = models["teacher"].get("flops", {}).get("image_gflops")
    rows = []
    for key, label in ROWS:
        if key not in models:
            continue
        m = models[key]
        zs = m["zeroshot"]
        rows.append({
            "model": label,
            "params_m": m["params"] / 1e6,
            "colour_shape_top1": zs["colour_shape"]["top1"],
            "colour_shape_top5": zs["colour_shape"].get("top5"),
            "shape_top1": zs.get("shape", {}).get("top1"),
            "colour_top1": zs.get("colour", {}).get("top1"),
            "i2t_r1": m["retrieval"]["i2t_r1"],
            "t2i_r1": m["retrieval"]["t2i_r1"],
            "ms_per_image": m["latency_ms_per_image"],
            "ms_per_image_b64": m["latency"]["latency_ms_per_image_b64"],
            "kept": zs["colour_shape"]["top1"] / teacher_top1 if teacher_top1 else float("nan"),
            # the paired median of rounds when the demo measured it (older metrics.json: one pair of medians)
            "speedup": m.get("speedup_b1", {}).get("median", t_lat / m["latency_ms_per_image"]),
            "flops_ratio": t_flops / m["flops"]["image_gflops"] if m.get("flops", {}).get("image_gflops") else None,
            "from_teacher": m.get("from_teacher", "–"),
            "speedup_b64": t_lat64 / m["latency"]["latency_ms_per_image_b64"],
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | from the teacher | params (M) | colour+shape top-1 | top-5 | shape top-1 | colour top-1 "
            "| I→T R@1 | T→I R@1 | ms/image b1 | ms/image b64 | × faster b1 / b64 | × fewer FLOPs/image "
            "| kept of teacher |")
    lines = [head, "|" + "---|" * 14]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        flops = "–" if r["flops_ratio"] is None else f"{r['flops_ratio']:.1f}"
        lines.append(f"| {r['model']} | {r['from_teacher']} | {r['params_m']:.1f} | {pct(r['colour_shape_top1'])} | "
                     f"{pct(r['colour_shape_top5'])} | {pct(r['shape_top1'])} | {pct(r['colour_top1'])} | "
                     f"{pct(r['i2t_r1'])} | {pct(r['t2i_r1'])} | {r['ms_per_image']:.3f} | "
                     f"{r['ms_per_image_b64']:.3f} | "
                     f"{r['speedup']:.1f} / {r['speedup_b64']:.1f} | {flops} | "
                     f"{pct(r['kept'])}% |")
    lines.append("")
    lines.append("kept of teacher: colour+shape top-1 relative to the teacher's. × faster b1: the median over rounds "
                 "of the teacher's and the student's batch-1 image encode time timed back to back (on one thread, by "
                 "its CPU time, where metrics.json says so); FLOPs: image tower.")
    return "\n".join(lines)


SEED_ROWS = (("teacher_top1", "teacher colour+shape top-1", 100, "%"),
             ("student_top1", "distilled student", 100, "%"),
             ("student_cached_top1", "distilled from the cache", 100, "%"),
             ("scratch_top1", "scratch student", 100, "%"), ("kept", "kept of teacher", 100, "%"),
             ("kd_minus_scratch", "KD − scratch", 100, " points"),
             ("cached_minus_online", "cached − online", 100, " points"), ("speedup_b1", "× faster at batch 1", 1, "×"))


def _one_decimal(x: float) -> str:
    return f"{round(x, 1) + 0.0:.1f}"  # + 0.0: a mean that rounds to zero prints 0.0, not -0.0


def seeds_table(result: dict[str, Any]) -> str:
    """``mmkd demo --seeds N``'s summary: each headline figure as mean ± sd over the seeds, then each seed's
    (a goal meant for one run is then seen on every seed, not only on the mean)."""
    s = result["summary"]
    per_seed = result.get("per_seed") or []
    lines = [f"| figure ({result['seeds']} seeds) | mean ± sd | per seed |", "|---|---|---|"]
    for key, label, scale, unit in SEED_ROWS:
        if key in s:
            each = ", ".join(_one_decimal(scale * f[key]) for f in per_seed if key in f)
            lines.append(f"| {label} | {_one_decimal(scale * s[key]['mean'])} ± {_one_decimal(scale * s[key]['sd'])}"
                         f"{unit} | {each} |")
    return "\n".join(lines + ["", f"`{result['command']}`"])


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    keys = [("colour_shape_top1", "colour+shape"), ("shape_top1", "shape"), ("colour_top1", "colour"),
            ("i2t_r1", "I→T R@1")]
    fig, ax = subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [100 * (r[k] or 0) for k, _ in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=r["model"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], [n for _, n in keys])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("Zero-shot accuracy and retrieval on the test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fileio.atomic_write_bytes(path, png(fig, dpi=110))


def plot_curves(run_dir: Path, teacher_dir: Path, path: Path) -> None:
    fig, axes = subplots(1, 2, figsize=(9, 3.4))
    teacher_log = read_jsonl(teacher_dir / "train_metrics.jsonl")
    evals = [(r["step"], 100 * next(iter(r["eval"].values()))) for r in teacher_log if "eval" in r]
    if evals:  # a teacher trained with validation points (the demo's own teacher logs its loss only)
        axes[0].plot(*zip(*evals), marker="o")
        axes[0].set_title("teacher: validation colour+shape top-1 (%)")
    else:
        pts = [(r["step"], r["loss"]) for r in teacher_log if "loss" in r]
        if pts:
            axes[0].plot(*zip(*pts))
        axes[0].set_title("teacher: training loss (contrastive)")
    axes[0].set_xlabel("step")
    for name in [n for n, _ in ROWS if n != "teacher"] + ["teacher"]:
        rows = (teacher_log if name == "teacher" else read_jsonl(run_dir / "train" / name / "metrics.jsonl"))
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if pts:
            axes[1].plot(*zip(*pts), label=name)
    axes[1].set_title("training loss")
    axes[1].set_xlabel("step")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fileio.atomic_write_bytes(path, png(fig, dpi=110))


def write_demo_report(run_dir: Path, metrics: dict[str, Any], teacher_dir: Path) -> Path:
    rows = table_rows(metrics)
    plot_accuracy(rows, run_dir / "accuracy.png")
    plot_curves(run_dir, teacher_dir, run_dir / "curves.png")
    text = ["# mmkd demo report", "", describe(metrics["demo"]["configs"]), "", markdown_table(rows), "",
            "![accuracy](accuracy.png)", "", "![curves](curves.png)", "",
            f"Total demo time: {metrics['demo']['seconds']:.0f} s.", ""]
    path = run_dir / "report.md"
    fileio.atomic_write_text(path, "\n".join(text))
    return path


def _vit(cfg: dict[str, Any]) -> str:
    v = cfg["student"]["vision"]["config"]
    return (f"ViT {v.get('num_hidden_layers')} layers, width {v.get('hidden_size')}, patch {v.get('patch_size')}, "
            f"{v.get('image_size')} px")


def describe(configs: dict[str, dict[str, Any]]) -> str:
    """One paragraph on what the demo trained, from its run configs (so it never disagrees with them)."""
    t, s = configs["teacher"], configs["student"]
    keep = s["student"]["vision"].get("keep_layers")
    student_vit = (f"the teacher's ViT with layers {', '.join(map(str, keep))} (inherited by the distilled students; "
                   "the scratch student has the same shape, freshly initialised)" if keep is not None else _vit(s))
    return (f"Built-in world. Teacher: {_vit(t)}, aligned to the frozen all-MiniLM-L6-v2 for {t['train']['steps']}"
            f" steps on {t['data']['world_size_train']} pool images. Students: {student_vit} + MiniLM with half its "
            f"layers (frozen), {s['train']['steps']} steps on {s['data']['world_size_train']} captioned "
            f"images; the distilled ones also see {s['data']['world_size_unpaired']} uncaptioned images through "
            "the teacher's image embeddings. Configs: configs/demo/*.yaml.")
