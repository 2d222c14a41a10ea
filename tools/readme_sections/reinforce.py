"""The README's dataset-reinforcement section: the leaderboard of ``configs/reinforce/world.yaml`` with what each
setting stores per sample and, in words generated from the numbers, what helped.

Inputs: ``runs/reinforce/sweep/leaderboard.json`` (the sweep) and ``bench/results/reinforce_world.json``
(``bench/reinforce_world.py``: the caches' bytes, the settings, the teachers' and the captioner's quality).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from mmkd.report.leaderboard import markdown
from readme_sections.core import SECTIONS, ResultsMissing, read_json

HOW = "run `python bench/reinforce_world.py` (after `make demo`, whose teacher is teacher A)"


def verdict(row: dict[str, Any], versus: str) -> str:
    """One row's Δ vs the baseline in words: helped / hurt only where the sweep found it beyond noise."""
    d, sd = row.get("d_top1"), row.get("d_top1_sd")
    if d is None:
        return ""
    spread = f"{100 * d:+.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")
    lo, hi = row.get("d_top1_lo"), row.get("d_top1_hi")
    interval = f", paired 95% interval {100 * lo:+.1f} to {100 * hi:+.1f}" if lo is not None and hi is not None else ""
    if row.get("beyond_noise"):
        word = "**helped**" if d > 0 else "**hurt**"
    else:
        word = "made no difference beyond noise"
    return f"`{row['run']}` {word}: {spread} points of top-1 vs `{versus}`{interval}."


@SECTIONS.register("reinforce-world")
def reinforce_world_section(root: Path) -> str:
    board = read_json(root / "runs" / "reinforce" / "sweep" / "leaderboard.json", "reinforce-world", HOW)
    bench = read_json(root / "bench" / "results" / "reinforce_world.json", "reinforce-world", HOW)
    rows, versus = board["rows"], board.get("versus", "scratch")
    students = [r for r in rows if r["role"] != "teacher"]
    seeds = max((r.get("seeds") or 1) for r in students) if students else 0
    train_s = sum((r.get("train_s") or 0) * (r.get("seeds") or 1) for r in students)
    out = [textwrap.fill(f"From `runs/reinforce/sweep/leaderboard.json`, written by `{board['command']}` inside "
                         f"`{bench['command']}` ({len(students)} settings × {seeds} seeds, {train_s / 60:.0f} minutes "
                         "of student training). "
                         f"{board['notes']}", 115), "", markdown(rows, versus=versus).strip(), ""]
    teachers = bench.get("teachers") or {}
    if teachers:
        parts = [f"{who.upper()} ({t['model']}) {100 * t['zeroshot']['top1']:.1f}%" for who, t in teachers.items()]
        out.append(textwrap.fill("Teachers' zero-shot top-1 on the same test images: " + ", ".join(parts) + ".",
                                 115))
    cap = bench.get("captioner")
    if cap:
        out += ["", textwrap.fill(
            f"Captioner (`bench/world_captioner.py --encoder` teacher A, {cap['config']['steps']} steps, "
            f"{cap['train_seconds']:.0f} s): on {cap['images']} world:val images its greedy captions name the right "
            f"colour and shape {100 * cap['colour_and_shape_greedy']:.1f}% of the time, sampled ones (top-p 0.9, as "
            f"stored) {100 * cap['colour_and_shape_sampled']:.1f}%; BLEU-4 {cap['bleu4_greedy']:.1f}. So about half "
            "the synthetic captions describe their image's object correctly, and positions are often wrong.", 115)]
    settings = bench.get("settings") or {}
    if settings:
        out += ["", "| setting | caches read | views drawn | RandAugment | synthetic captions "
                    "| bytes per sample stored for it¹ |", "|---|---|---:|:---:|:---:|---:|"]
        for name, s in settings.items():
            out.append(f"| {name} | {', '.join(s['caches'])} | {s['views']} | {'yes' if s['randaugment'] else ''} | "
                       f"{'yes' if s['synthetic_captions'] else ''} | {s['embedding_bytes_per_sample']:,.0f} |")
        caches = bench.get("caches") or {}
        built = "; ".join(f"{n}: {c['embedding_bytes_per_sample']:,.0f} ({c['folder_bytes_per_sample']:,.0f} with "
                          "keys, captions and index)" for n, c in caches.items())
        out += ["", textwrap.fill(
            "¹ Embedding bytes per sample (float16) a cache built for exactly that setting stores: each teacher's "
            "image embeddings for the views drawn, the real captions' text embeddings and, where on, the synthetic "
            "captions', from the measured per-array bytes of the caches read. The caches as built (bytes per sample "
            f"in embedding arrays): {built}.", 115)]
    verdicts = [v for v in (verdict(r, versus) for r in students) if v]
    if verdicts:
        out += ["", "What helped, by the sweep's noise rule (paired interval excludes 0 and |Δ| exceeds the spread "
                    "over seeds):", ""]
        out += [textwrap.fill(v, 113, initial_indent="- ", subsequent_indent="  ") for v in verdicts]
    return "\n".join(out)


CROPS_HOW = "run `python bench/reinforce_crops.py --teacher DIR --seeds 3` (DIR: the demo's teacher)"
CIFAR_HOW = "run `python bench/reinforce_cifar.py --teacher DIR --seeds 3` (DIR: a CIFAR-10 teacher)"


def _top1(row: dict[str, Any]) -> str:
    sd = row.get("zs_top1_sd")
    return f"{100 * row['zs_top1']:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _delta(row: dict[str, Any]) -> str:
    """Δ vs the baseline, bold where the sweep's noise rule calls it beyond noise."""
    d, sd = row.get("d_top1"), row.get("d_top1_sd")
    if d is None:
        return ""
    text = f"{100 * d:+.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")
    return f"**{text}**" if row.get("beyond_noise") else text


def _phases(bench: dict[str, Any]) -> str:
    return "; ".join(f"{k} {v / 60:.1f} min" for k, v in bench.get("phases_s", {}).items())


@SECTIONS.register("reinforce-crops")
def reinforce_crops_section(root: Path) -> str:
    bench = read_json(root / "bench" / "results" / "reinforce_crops.json", "reinforce-crops", CROPS_HOW)
    board = bench["leaderboard"]
    rows, versus = board["rows"], board.get("versus", "scratch")
    students = [r for r in rows if r["role"] != "teacher"]
    seeds = max((r.get("seeds") or 1) for r in students) if students else 0
    caches = "; ".join(f"{n}: crop_scale {c['crop_scale']}, {c['embedding_bytes_per_sample']:,.0f} B/sample"
                       for n, c in bench["caches"].items())
    out = [textwrap.fill(f"From `bench/results/reinforce_crops.json`, written by `{bench['command']}` "
                         f"(`{board['command']}` inside it: {len(students)} settings × {seeds} seeds, "
                         f"{bench['steps']} steps each; teacher `{Path(bench['teacher']).name}`; phases: "
                         f"{_phases(bench)}). {board['notes']}", 115), "",
           markdown(rows, versus=versus).strip(), "",
           textwrap.fill(f"Caches ({bench['views']} views, float16): {caches}.", 115)]
    verdicts = [v for v in (verdict(r, versus) for r in students) if v]
    if verdicts:
        out += ["", "By the sweep's noise rule (paired interval excludes 0 and |Δ| exceeds the spread over seeds):",
                ""]
        out += [textwrap.fill(v, 113, initial_indent="- ", subsequent_indent="  ") for v in verdicts]
    return "\n".join(out)


@SECTIONS.register("reinforce-cifar")
def reinforce_cifar_section(root: Path) -> str:
    bench = read_json(root / "bench" / "results" / "reinforce_cifar.json", "reinforce-cifar", CIFAR_HOW)
    schedules = sorted(bench["schedules"].values(), key=lambda s: s["steps"])
    if not schedules:
        raise ResultsMissing(f"results:reinforce-cifar: no schedule finished yet; {CIFAR_HOW}")
    first = schedules[0]["leaderboard"]
    versus = first.get("versus", "scratch")
    names = [r["run"] for r in first["rows"] if r["role"] != "teacher"]
    others = [n for n in names if n != versus]
    head = (f"| schedule | {versus} top-1 % | " + " | ".join(f"{n}: Δ top-1 (pts)" for n in others) + " |")
    lines = [head, "|---|---:|" + "---:|" * len(others)]
    for s in schedules:
        by = {r["run"]: r for r in s["leaderboard"]["rows"]}
        base = by.get(versus)
        cells = [_delta(by[n]) if n in by else "" for n in others]
        lines.append(f"| {s['steps']} steps ({s['epochs']:g} epochs) | {_top1(base) if base else ''} | "
                     + " | ".join(cells) + " |")
    seeds = max((r.get("seeds") or 1) for s in schedules for r in s["leaderboard"]["rows"])
    t = bench["teacher"]
    caches = "; ".join(f"{n} ({' '.join(c['flags'])}): {c['embedding_bytes_per_sample']:,.0f} B/sample"
                       for n, c in bench["caches"].items())
    out = [textwrap.fill(
        f"From `bench/results/reinforce_cifar.json`, written by `{bench['command']}` ({len(schedules)} schedules × "
        f"{len(names)} settings × {seeds} seeds; each schedule one `mmkd sweep`, e.g. `{first['command']}`). "
        f"Training subset: the first {bench['images']:,} training images, batch {bench['batch_size']} "
        f"({bench['steps_per_epoch']:g} steps per epoch); zero-shot top-1 on the 10,000 test images. Teacher "
        f"`{t['model']}`: {100 * t['zeroshot']['top1']:.1f}%. Δ is each setting's mean top-1 minus {versus}'s at "
        "the same steps, ± the sd over seeds of the paired differences; **bold**: beyond noise by the sweep's rule "
        "(paired 95% bootstrap interval over test images excludes 0 and |Δ| exceeds the spread over seeds). "
        f"Phases: {_phases(bench)}.", 115), "", *lines, "",
        textwrap.fill(f"Caches ({bench['views']} views, float16): {caches}.", 115)]
    for s in schedules:
        board = s["leaderboard"]
        out += ["", f"{s['steps']} steps:", "", markdown(board["rows"], versus=versus).strip()]
    return "\n".join(out)
