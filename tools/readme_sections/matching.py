"""The matching study's README sections (``docs/matching.md``): the demo's table, the students over seeds and the
KD sweep, from the study's JSON under ``runs/matching/``. The tables themselves are the study's
(``mmkd.studies.matching.report``), which writes them into its own reports too.
"""

from __future__ import annotations

from pathlib import Path

from mmkd.studies.matching.report import LABELS, _pct, demo_table, leaderboard_md, seeds_summary, seeds_table
from readme_sections.core import SECTIONS, read_json


@SECTIONS.register("matching")
def readme_section(root: Path) -> str:
    """The README's matching results: the demo's table from ``runs/matching/matching.json`` and ``demo.json``."""
    how = "run `mmkd matching demo configs/matching/demo.yaml` first"
    results = read_json(root / "runs" / "matching" / "matching.json", "matching", how)
    demo = read_json(root / "runs" / "matching" / "demo.json", "matching", how)
    settings = demo.get("settings", {})
    study_s = sum(d.get("seconds", 0) for d in settings.values())
    head = (f"From `runs/matching/matching.json` of one `mmkd matching demo configs/matching/demo.yaml` run (seed "
            f"{demo.get('config', {}).get('train', {}).get('seed', 0)}, nothing tuned on test; "
            f"{demo['seconds']:.0f} s in all, {study_s:.0f} s of it in the studies):")
    return head + "\n\n" + demo_table(results)


@SECTIONS.register("matching-seeds")
def seeds_section(root: Path) -> str:
    """The demo's students over several seeds (``runs/matching/seeds.json``): mean ± sd of test F1."""
    how = "run `mmkd matching demo configs/matching/demo.yaml` (its seeds section) first"
    seeds = read_json(root / "runs" / "matching" / "seeds.json", "matching-seeds", how)
    n = sum(1 for s in seeds["settings"].values() for r in s["runs"] if not r["reused"])
    head = (f"From `runs/matching/seeds.json` of the same `mmkd matching demo configs/matching/demo.yaml` run: "
            f"seeds {', '.join(map(str, seeds['seeds']))} on the same pairs and teacher (the seed sets a student's "
            f"initialisation and batch order; {n} extra student runs, the demo's own seed reused). Test F1, "
            "mean ± sample sd over the seeds; the baseline never uses transfer pairs, so its two rows are the "
            "same runs:")
    return "\n".join([head, "", seeds_table(seeds), "", *seeds_summary(seeds)])


# ------------------------------------------------------------------------------------------------ sweep section

SWEEP_COMMAND = "mmkd matching sweep configs/matching/demo_sweep.yaml"


@SECTIONS.register("matching-sweep")
def sweep_section(root: Path, top: int = 5) -> str:
    """The KD sweep on the demo's random pairs (``runs/matching/sweep/sweep.json``): top of the leaderboard,
    the last row and the references, and the spread of the whole grid."""
    how = f"run `mmkd matching demo configs/matching/demo.yaml`, then `{SWEEP_COMMAND}`"
    sweep = read_json(root / "runs" / "matching" / "sweep" / "sweep.json", "matching-sweep", how)
    rows = sweep["leaderboard"]
    kd = [r for r in rows if r["rank"] != ""]
    refs = [r for r in rows if r["rank"] == ""]
    train = sweep.get("config", {}).get("train", {})
    cut = len(kd) > top + 1
    table = leaderboard_md([*kd[:top], kd[-1]] + refs if cut else kd + refs).split("\n")
    if cut:  # after the header's two lines and the top rows
        table.insert(2 + top, "| … |" + " |" * 9)
    head = (f"From `runs/matching/sweep/sweep.json`, written by `{SWEEP_COMMAND}` on `{sweep['pairs']}` "
            f"({len(kd)} KD runs, {train.get('epochs', '?')} epochs each, transfer pairs per pair: "
            f"{train.get('transfer', 0)}; {sweep['seconds'] / 60:.0f} minutes in all). Ranked by validation F1; "
            "the top, the last and the references:")
    out = [head, "", *table, ""]
    if kd:
        vals, tests = [r["val_f1"] for r in kd], [r["test_f1"] for r in kd]
        out.append(f"The {len(kd)} KD runs span {_pct(min(vals))}–{_pct(max(vals))} validation F1 and "
                   f"{_pct(min(tests))}–{_pct(max(tests))} test F1; "
                   + "; ".join(f"{LABELS.get(r['model'], r['model'])} {_pct(r['val_f1'])} / {_pct(r['test_f1'])}"
                               for r in refs) + " (validation / test F1).")
    s2 = next((r for r in kd if (r["variant"], r["temperature"], r["alpha"]) == ("bce", 3.0, 0.5)), None)
    if s2 is not None:
        out.append(f"S2's best setting (KD-BCE, T = 3, α = 0.5) ranks {s2['rank']} of {len(kd)} here.")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ hard-negative grid

@SECTIONS.register("matching-hard")
def hard_section(root: Path) -> str:
    """KD settings on the demo's hard pairs over seeds (``bench/results/matching_hard.json``): the one chosen on
    validation F1 and every setting's test F1 as a share of the teacher's."""
    how = "run `python bench/matching_hard.py` first"
    r = read_json(root / "bench" / "results" / "matching_hard.json", "matching-hard", how)
    t_val, t_test = r["teacher"]["val"]["f1"], r["teacher"]["test"]["f1"]
    head = (f"From `bench/results/matching_hard.json`, written by `{r['command'].strip()}` "
            f"({len(r['rows']) * len(r['seeds'])} student runs, {r['student_seconds'] / 60:.0f} minutes of student "
            f"training on {r['threads']} thread): the demo's hard pairs and teacher, {r['epochs']} epochs unless the "
            f"table says otherwise, seeds {', '.join(map(str, r['seeds']))}; the setting is chosen by mean "
            "validation F1, test F1 is mean ± sample sd:")
    lines = ["| student | α | transfer pairs per pair | T | epochs | val F1 | test F1 | test F1 kept of teacher "
             "| chosen on val |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| teacher | | | | | {_pct(t_val)} | {_pct(t_test)} | | |"]
    for row in r["rows"]:
        kd = row["alpha"] is not None
        name, alpha, transfer, temp = (("KD-KL", f"{row['alpha']:g}", row["transfer"], f"{row['temperature']:g}")
                                       if kd else ("baseline (BCE)", "", "", ""))
        lines.append(f"| {name} | {alpha} | {transfer} | {temp} | {row['epochs'] or r['epochs']} | "
                     f"{_pct(row['val_f1'])} | "
                     f"{_pct(row['test_f1'])} ± {_pct(row['test_f1_sd'])} | {100 * row['kept']:.0f}% | "
                     f"{'yes' if row['chosen'] else ''} |")
    c = r["chosen_vs_demo"]
    chosen = next(row for row in r["rows"] if row["chosen"])
    tail = (f"The setting chosen on validation keeps {100 * chosen['kept']:.1f}% of the teacher's test F1; against "
            f"the demo's setting (α = 0.5, 4 transfer pairs) its test F1 differs by {100 * c['d_test_f1']:+.1f} "
            f"points, {'beyond' if c['beyond_noise'] else 'within'} the combined spread over seeds.")
    return "\n".join([head, "", *lines, "", tail])
