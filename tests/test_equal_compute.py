"""The equal-compute study's parts (issue 21 item 2): evaluations during training at the requested steps, their time
left out of the training clock, the summary of where the cached student reaches the online one, and its README
section."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import write_run_config

from mmkd.config import load_config
from mmkd.fileio import read_jsonl
from mmkd.pipeline import run_distill
from mmkd.train import loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import equal_compute  # noqa: E402

from readme_sections import SECTIONS  # noqa: E402

EVAL_S = 1000.0  # what one fake evaluation costs on the fake clock: far more than the whole tiny run


def test_curve_points_at_requested_steps_and_eval_time_excluded(tmp_path: Path, tiny_teacher_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation that takes 1000 s (wall and CPU) on the loop's clock: the curve is evaluated at steps 2, 4 and
    the last (5), in eval mode, and neither time_s, cpu_s nor the run's seconds count it."""
    offset = {"wall": 0.0, "cpu": 0.0}
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset["wall"],
                                  process_time=lambda: time.process_time() + offset["cpu"])
    monkeypatch.setattr(loop, "time", clock)
    seen: list[bool] = []

    def curve(student: Any) -> dict[str, Any]:
        seen.append(student.training)
        offset["wall"] += EVAL_S
        offset["cpu"] += EVAL_S
        return {"top1": 0.5}

    path = write_run_config(tmp_path, tiny_teacher_dir, objectives="[{name: clip}]",
                            train="steps: 5, log_every: 1, warmup_steps: 1")
    path.write_text(path.read_text().replace("keep_layers: [1]", "keep_layers: [0]"))  # the tiny teacher: 1 layer
    cfg = load_config(path)
    run_distill(cfg, progress=False, log=lambda *_: None, curve=curve, curve_every=2)
    records = [r for _, r in read_jsonl(tmp_path / "run" / "metrics.jsonl", "metrics")]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert seen == [False, False, False]  # the student is evaluated in eval mode
    logged = [r for r in records if "eval" not in r]  # the loop's per-step lines
    assert [r["time_s"] < EVAL_S for r in logged] == [True] * len(logged)  # 7b79a9b: 1000+ s after step 2
    assert [r["time_s"] < EVAL_S for r in records] == [True] * len(records)
    assert [r["cpu_s"] < EVAL_S for r in records] == [True] * len(records)
    assert all(r["eval_s"] >= EVAL_S for r in evals)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["seconds"] < EVAL_S


def _run(mode: str, seed: int, tops: list[float], step_s: float) -> dict[str, Any]:
    curve = [{"step": 10 * (i + 1), "time_s": step_s * 10 * (i + 1), "cpu_s": 2 * step_s * 10 * (i + 1),
              "eval_s": 1.0, "top1": t, "samples": 640 * (i + 1)} for i, t in enumerate(tops)]
    return {"mode": mode, "seed": seed, "samples_per_step": 64, "curve": curve}


def _result(cached_tops: list[float]) -> dict[str, Any]:
    runs = {"scratch": [_run("scratch", 0, [0.1, 0.2, 0.3, 0.3], 1.0)],
            "online": [_run("online", 0, [0.2, 0.3, 0.4, 0.5], 3.0)],
            "cached": [_run("cached", 0, cached_tops, 1.0)]}
    summary = equal_compute.summarise(runs, cache_build_s=6.0, b16_online_over_cached=7.0)
    details = {"steps": 40, "eval_every": 10, "val_images": 100, "views": 2, "seeds": [0], "cache_build_s": 6.0,
               "teacher": "t", "teacher_steps": 200, "teacher_top1": 0.7, "overrides": [],
               "b16_online_over_cached_time": 7.0, "b16_source": "bench/results/cache_cost.json", "seconds": 1}
    return {"summary": summary, "runs": runs, "details": details}


def test_summary_finds_where_the_cached_student_reaches_the_online_one() -> None:
    r = _result([0.3, 0.5, 0.55, 0.6])["summary"]
    (row,) = r["per_seed"]
    # online ends at 0.5 after 40 steps × 3 s = 120 s; cached first reaches 0.5 at step 20, 20 s
    assert row["reached"] and row["reached_at_step"] == 20
    assert r["time_fraction"] == pytest.approx(20 / 120)
    assert r["time_fraction_with_build"] == pytest.approx(26 / 120)
    assert r["cpu_fraction"] == pytest.approx(40 / 240)
    assert r["b16_time_fraction"] == pytest.approx(20 / 40 / 7.0)
    assert r["equal_steps_time_fraction"] == pytest.approx(40 / 120)
    missed = _result([0.3, 0.4, 0.45, 0.49])["summary"]
    assert not missed["per_seed"][0]["reached"] and "time_fraction" not in missed


def test_readme_section_renders_the_study(tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "equal_compute.json").write_text(json.dumps(_result([0.3, 0.5, 0.55, 0.6])))
    text = SECTIONS.get("bench-equal-compute")(tmp_path)
    assert "| cached | 0 | 60.0 | 40 | 2,560 | 40 s | 80 s |" in text
    assert "**0.17**" in text and "step 20" in text and "**0.071**" in text
    assert "At equal steps the cached student trains in 0.33" in text
    assert "equal_compute.png" in text and "trained 200 steps, top-1 70.0" in text
    (results / "equal_compute.json").write_text(json.dumps(_result([0.3, 0.4, 0.45, 0.49])))
    assert "does not reach" in SECTIONS.get("bench-equal-compute")(tmp_path)


def test_online_config_augments_the_uncaptioned_images_and_the_others_match(tmp_path: Path) -> None:
    """(b) and (c) differ only in where the teacher's answers come from; scratch has no distillation terms."""
    args = types.SimpleNamespace(work=str(tmp_path), steps=7, threads=0, override=[])
    cfgs = {m: equal_compute.run_config(m, args, 3, tmp_path / "teacher", tmp_path / "cache")
            for m in equal_compute.MODES}
    assert cfgs["online"].data.augment and not cfgs["online"].data.augment_paired
    assert cfgs["cached"].teacher == f"cache:{tmp_path / 'cache'}"
    for c in cfgs.values():
        assert c.train.steps == 7 and c.train.seed == 3
    assert cfgs["online"].objectives == cfgs["cached"].objectives
    assert cfgs["online"].student.vision == cfgs["cached"].student.vision
    assert [o.name for o in cfgs["scratch"].objectives] == ["clip"]
