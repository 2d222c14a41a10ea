"""``mmkd matching sweep``: both KD variants over a grid of temperatures and α, ranked on validation F1.

The teacher is fine-tuned once and its logits cached, and the student's sentence features are computed once,
so each grid point costs one student training. The ranking uses validation F1 only; test numbers are shown
beside it and never used to choose.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from mmkd.errors import UsageError
from mmkd.matching.losses import MATCHING_KD, KDConfig, check_kd_params
from mmkd.matching.report import leaderboard_csv, leaderboard_md, leaderboard_rows
from mmkd.matching.study import MatchingStudy, _atomic_json

TEMPERATURES = (1.5, 2.0, 2.5, 3.0)
ALPHAS = (0.4, 0.5, 0.6)


def grid(temperatures: Sequence[float] = TEMPERATURES, alphas: Sequence[float] = ALPHAS,
         variants: Sequence[str] = ("kl", "bce")) -> list[KDConfig]:
    """Every (variant, T, α), validated before anything trains."""
    if not temperatures or not alphas or not variants:
        raise UsageError("the sweep needs at least one temperature, one alpha and one variant")
    for t in temperatures:
        for a in alphas:
            check_kd_params(t, a)
    for v in variants:
        MATCHING_KD.get(v)
    return [KDConfig(v, float(t), float(a)) for v in variants for t in temperatures for a in alphas]


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
    (out / "leaderboard.csv").write_text(leaderboard_csv(rows))
    head = [f"# KD sweep on `{study.data.pairset.path}`", "",
            "Ranked by validation F1 (threshold chosen on val); test columns are for reading, not choosing.", ""]
    (out / "leaderboard.md").write_text("\n".join(head + [leaderboard_md(rows), ""]))
    summary = {"pairs": str(study.data.pairset.path), "leaderboard": rows,
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in results],
               "config": study.cfg.to_json(), "seconds": round(time.perf_counter() - t0, 1)}
    _atomic_json(out / "sweep.json", summary)
    return summary
