"""The reinforcement studies' plumbing (bench/reinforce_cifar.py, bench/reinforce_crops.py) and their docs blocks:
schedules in whole steps, controls added to the sweep with the caches moved, paths recorded relative to the repo,
and the blocks rendered from the JSON (Δ in bold only where the sweep's noise rule says beyond noise)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reinforce_cifar  # noqa: E402

from readme_sections import SECTIONS  # noqa: E402
from readme_sections.core import ResultsMissing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_schedules_are_whole_steps_of_the_subset() -> None:
    assert reinforce_cifar.schedule_steps([2, 8, 30], 5000, 128) == [78, 312, 1172]
    assert reinforce_cifar.schedule_steps([0.001], 100, 64) == [1]  # never zero steps


def test_controls_join_the_grid_and_caches_follow_the_work_folder(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(ROOT)
    default = reinforce_cifar.DEFAULT_WORK
    assert reinforce_cifar.sweep_config([], tmp_path, default, {"limit": 5000, "batch_size": 128}) == \
        Path(reinforce_cifar.CONFIG)
    # another subset: caches and sweeps read one derived config, so the caches hold the images trained on
    bigger = yaml.safe_load(reinforce_cifar.sweep_config([], tmp_path, default, {"limit": 50000}).read_text())
    assert bigger["data"]["limit"] == 50000 and bigger["teacher"] == f"cache:{default}/cache-k10"
    work = tmp_path / "w"
    path = reinforce_cifar.sweep_config([f"k10_s035:teacher=cache:{work}/cache-s035;data.views=10"], tmp_path, work)
    data = yaml.safe_load(path.read_text())
    assert data["teacher"] == f"cache:{work}/cache-k10"
    assert data["sweep"]["variants"]["k10"]["teacher"] == f"cache:{work}/cache-k10"
    assert data["sweep"]["variants"]["k10_s035"] == {"teacher": f"cache:{work}/cache-s035", "data.views": 10}
    assert data["sweep"]["grid"]["setting"] == ["k1", "k10", "k10_ra", "k10_s035"]
    assert data["recipe"] == "mobileclip"


def test_paths_are_recorded_relative_to_the_repo(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(ROOT)
    assert reinforce_cifar.repo_relative(str(ROOT / "configs")) == "configs"
    assert reinforce_cifar.repo_relative(str(tmp_path)) == os.path.relpath(tmp_path)
    assert reinforce_cifar.repo_relative("--seeds") == "--seeds"
    assert reinforce_cifar.repo_relative("/no/such/place") == "/no/such/place"


def _row(run: str, top1: float, d: float | None = None, beyond: bool | None = None) -> dict[str, Any]:
    row = {"run": run, "role": "distilled", "objectives": "dr_clip", "seeds": 3, "zs_top1": top1,
           "zs_top1_sd": 0.01, "zs_top1_lo": top1 - 0.01, "zs_top1_hi": top1 + 0.01, "zs_top5": 0.9}
    if d is not None:
        row.update(d_top1=d, d_top1_sd=0.004, d_top1_lo=d - 0.01, d_top1_hi=d + 0.01, beyond_noise=beyond)
    return row


def _board(steps: int, d: float, beyond: bool) -> dict[str, Any]:
    return {"command": f"mmkd sweep x.yaml train.steps={steps}", "notes": "Zero-shot: cifar10.",
            "versus": "setting-k1",
            "rows": [_row("setting-k1", 0.40), _row("setting-k10", 0.40 + d, d, beyond)]}


def test_cifar_block_orders_schedules_and_marks_beyond_noise(tmp_path: Path) -> None:
    bench = {"command": "python bench/reinforce_cifar.py --teacher t", "config": "c.yaml",
             "teacher": {"model": "t", "zeroshot": {"top1": 0.661}}, "images": 5000, "batch_size": 128, "views": 10,
             "steps_per_epoch": 39.06, "seconds": 1.0, "phases_s": {"sweep 1172 steps": 600.0},
             "caches": {"cache-k10": {"flags": ["--hflip"], "embedding_bytes_per_sample": 7681.5}},
             "schedules": {"1172": {"epochs": 30, "steps": 1172, "leaderboard": _board(1172, 0.052, True)},
                           "78": {"epochs": 2, "steps": 78, "leaderboard": _board(78, -0.003, False)}}}
    out = tmp_path / "bench" / "results"
    out.mkdir(parents=True)
    (out / "reinforce_cifar.json").write_text(json.dumps(bench))
    text = SECTIONS.get("reinforce-cifar")(tmp_path)
    short, long = text.index("| 78 steps (2 epochs) | 40.0 ± 1.0 | -0.3 ± 0.4 |"), text.index(
        "| 1172 steps (30 epochs) | 40.0 ± 1.0 | **+5.2 ± 0.4** |")
    assert short < long
    assert "Teacher `t`: 66.1%" in text and "sweep 1172 steps 10.0 min" in text
    bench["schedules"] = {}
    (out / "reinforce_cifar.json").write_text(json.dumps(bench))
    with pytest.raises(ResultsMissing, match="no schedule finished yet"):
        SECTIONS.get("reinforce-cifar")(tmp_path)


def test_crops_block_renders_the_board_and_verdicts(tmp_path: Path) -> None:
    bench = {"command": "python bench/reinforce_crops.py --teacher t", "config": "c.yaml", "teacher": "t",
             "steps": 200, "views": 10, "seconds": 1.0, "phases_s": {"sweep": 120.0},
             "caches": {"cache-s035": {"crop_scale": [0.35, 1.0], "embedding_bytes_per_sample": 8474.9}},
             "leaderboard": _board(200, -0.017, True)}
    out = tmp_path / "bench" / "results"
    out.mkdir(parents=True)
    (out / "reinforce_crops.json").write_text(json.dumps(bench))
    text = SECTIONS.get("reinforce-crops")(tmp_path)
    assert "| setting-k10 | distilled | dr_clip | 3 | 38.3 ± 1.0 |" in text
    assert "`setting-k10` **hurt**: -1.7 ± 0.4 points of top-1 vs `setting-k1`" in text
    assert "cache-s035: crop_scale [0.35, 1.0], 8,475 B/sample" in text
