"""``mmkd matching sweep``: the KD variants over a grid of temperatures and α (the config's ``sweep``), ranked on
validation F1.

The teacher is fine-tuned once and its logits cached, and the student's sentence features are computed once,
so each grid point costs one student training. The ranking uses validation F1 only; test numbers are shown
beside it and never used to choose.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from mmkd.config_io import to_dict
from mmkd.fileio import atomic_write_json, atomic_write_text
from mmkd.studies.matching.losses import KDConfig
from mmkd.studies.matching.report import leaderboard_csv, leaderboard_md, leaderboard_rows
from mmkd.studies.matching.study import MatchingStudy


def run_sweep(study: MatchingStudy, configs: Sequence[KDConfig], log: Any = print) -> dict[str, Any]:
    """Teacher and baseline once, then one KD student per config; writes leaderboard.md/.csv and sweep.json."""
    out = study.out
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = [{"name": "teacher", **study.teacher_result()},
                                     {"name": "baseline", **study.run_student(None)}]
    for i, kd in enumerate(configs, 1):
        log(f"[{i}/{len(configs)}] {kd.name} T={kd.temperature} α={kd.alpha}")
        r = study.run_student(kd)
        results.append({"name": kd.name, **r})
    rows = leaderboard_rows(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "leaderboard.csv", leaderboard_csv(rows))
    head = [f"# KD sweep on `{study.data.pairset.path}`", "",
            "Ranked by validation F1 (threshold chosen on val); test columns are for reading, not choosing.", ""]
    atomic_write_text(out / "leaderboard.md", "\n".join(head + [leaderboard_md(rows), ""]))
    summary = {"pairs": str(study.data.pairset.path), "leaderboard": rows,
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in results],
               "config": to_dict(study.cfg), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "sweep.json", summary)
    return summary
