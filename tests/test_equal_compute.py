"""The equal-compute study's parts (issue 21 item 2): evaluations during training at the requested steps, their time
left out of the training clock, the summary of where the cached student reaches the online one, and its README
section."""

from __future__ import annotations

import json
import sys
import time
import types
from dataclasses import replace
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
    text = " ".join(SECTIONS.get("bench-equal-compute")(tmp_path).split())  # wrapping aside
    assert "| cached | 0 | 60.0 | 40 | 2,560 | 40 s | 80 s |" in text
    assert "**0.17**" in text and "step 20" in text and "**0.071**" in text
    assert "At equal steps the cached student trains in 0.33" in text
    assert "equal_compute.png" in text and "trained 200 steps, top-1 70.0" in text
    (results / "equal_compute.json").write_text(json.dumps(_result([0.3, 0.4, 0.45, 0.49])))
    assert "does not reach" in SECTIONS.get("bench-equal-compute")(tmp_path)


def test_online_config_augments_the_uncaptioned_images_and_the_others_match(tmp_path: Path) -> None:
    """(b) and (c) differ only in where the teacher's answers come from; scratch has no distillation terms."""
    args = types.SimpleNamespace(work=str(tmp_path), steps=7, threads=0, override=[], views=3)
    cfgs = {m: equal_compute.run_config(m, args, 3, tmp_path / "teacher", tmp_path / "cache")
            for m in equal_compute.MODES + equal_compute.EXTRA_MODES}
    assert cfgs["online"].data.augment and not cfgs["online"].data.augment_paired
    # online: a fresh crop at every step; the control and the cached student: the K views a cache holds
    assert cfgs["online"].data.views is None
    assert cfgs["online_views"].data.views == cfgs["cached"].data.views == 3
    assert cfgs["online"].data.crop_scale == cfgs["online_views"].data.crop_scale
    assert cfgs["cached"].teacher == f"cache:{tmp_path / 'cache'}"
    for c in cfgs.values():
        assert c.train.steps == 7 and c.train.seed == 3
    assert cfgs["online"].objectives == cfgs["cached"].objectives
    # both inherit the teacher's ViT layers: the cached one from the teacher's folder (a cache holds no weights;
    # fa8904a left source: teacher, which a cached teacher refuses)
    assert cfgs["online"].student.vision.source == "teacher"
    assert cfgs["cached"].student.vision.source == str(tmp_path / "teacher")
    assert replace(cfgs["online"].student.vision, source="x") == replace(cfgs["cached"].student.vision, source="x")
    assert [o.name for o in cfgs["scratch"].objectives] == ["clip"]


def test_a_rerun_reuses_finished_runs_and_redoes_changed_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A study stopped for time resumes: a run whose key (mode, seed, teacher, cache, steps, evaluation,
    overrides) matches a finished one is read back, not trained again; one with another key is trained."""
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **_: Any) -> Any:
        calls.append(cmd)
        res = _run(cmd[cmd.index("--worker") + 1], int(cmd[cmd.index("--seed") + 1]), [0.1, 0.2], 1.0)
        return types.SimpleNamespace(returncode=0, stdout="log line\n" + json.dumps(res) + "\n", stderr="")

    monkeypatch.setattr(equal_compute.subprocess, "run", fake_run)
    (tmp_path / "seed1").mkdir()
    args = types.SimpleNamespace(work=str(tmp_path), steps=20, eval_every=10, val=50, threads=0, override=[])
    first = equal_compute.one_run("cached", 1, tmp_path / "t", tmp_path / "c", args)
    again = equal_compute.one_run("cached", 1, tmp_path / "t", tmp_path / "c", args)
    assert again == first and len(calls) == 1
    args.steps = 30
    equal_compute.one_run("cached", 1, tmp_path / "t", tmp_path / "c", args)
    equal_compute.one_run("online", 1, tmp_path / "t", tmp_path / "c", args)
    assert len(calls) == 3


def test_each_finished_seed_is_written_before_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's JSON holds every seed finished so far (a study stopped for time keeps them) and a cache
    found built keeps its first build's time."""
    (tmp_path / "cache" / "teacher-cache-k2").mkdir(parents=True)
    (tmp_path / "cache" / "teacher-cache-k2.build.json").write_text(json.dumps({"teacher": str(tmp_path / "t"),
                                                                                "seconds": 12.5}))
    monkeypatch.setattr(equal_compute, "teacher_val_top1", lambda *_: 0.6)
    out = tmp_path / "r.json"
    seen: list[int] = []

    def fake_one_run(mode: str, seed: int, *_: Any) -> dict[str, Any]:
        if mode == MODES_FIRST and seed == 1:  # seed 0 is on disk before seed 1 starts
            seen.extend(json.loads(out.read_text())["details"]["seeds"])
        return _run(mode, seed, [0.1, 0.2 if mode == "cached" else 0.15], 1.0)

    MODES_FIRST = equal_compute.MODES[1]  # seed 1's order starts with the second mode
    monkeypatch.setattr(equal_compute, "one_run", fake_one_run)
    args = types.SimpleNamespace(work=str(tmp_path), teacher=str(tmp_path / "t"), views=2, seeds=[0, 1], steps=20,
                                 eval_every=10, val=50, threads=0, override=[], json=str(out),
                                 modes=list(equal_compute.MODES))
    result = equal_compute.study(args)
    assert seen == [0] and result["details"]["seeds"] == [0, 1]
    assert result["details"]["cache_build_s"] == 12.5
    assert json.loads(out.read_text())["summary"] == result["summary"]


def test_spread_over_seeds_and_paired_deltas_with_the_sweeps_noise_rule() -> None:
    """Final top-1 as mean ± sample sd over seeds; Δ paired by seed; beyond noise when |mean Δ| exceeds
    sqrt(sd_a² + sd_b²) (the rule of `mmkd sweep --seeds`), and undecided with one seed."""
    finals = {"scratch": [0.30, 0.31, 0.29], "online": [0.50, 0.52, 0.48], "cached": [0.45, 0.47, 0.49]}
    runs = {m: [_run(m, s, [v / 2, v], 1.0) for s, v in enumerate(vals)] for m, vals in finals.items()}
    out = equal_compute.summarise(runs, cache_build_s=0.0, b16_online_over_cached=None)
    assert out["final_top1"]["online"]["mean"] == pytest.approx(0.50)
    assert out["final_top1"]["online"]["sd"] == pytest.approx(0.02)
    d = out["deltas"]["cached-online"]  # −0.05, −0.05, +0.01: mean −0.03; sd of each mode 0.02
    assert d["mean"] == pytest.approx(-0.03) and d["sd"] == pytest.approx(0.034641, rel=1e-4)
    assert d["beyond_noise"] is True  # |−0.03| > sqrt(0.02² + 0.02²) = 0.0283
    assert out["deltas"]["online-scratch"]["beyond_noise"] is True
    runs["cached"][2]["curve"][-1]["top1"] = 0.53  # Δ −0.05, −0.05, +0.05: mean −0.017 < sqrt(0.042² + 0.02²)
    assert equal_compute.summarise(runs, 0.0, None)["deltas"]["cached-online"]["beyond_noise"] is False
    one = equal_compute.summarise({m: rs[:1] for m, rs in runs.items()}, 0.0, None)
    assert one["final_top1"]["cached"]["sd"] is None and one["deltas"]["cached-online"]["beyond_noise"] is None


def test_readme_section_gives_the_spread_over_seeds(tmp_path: Path) -> None:
    finals = {"scratch": [0.30, 0.31, 0.29], "online": [0.50, 0.52, 0.48], "cached": [0.45, 0.47, 0.49]}
    runs = {m: [_run(m, s, [v / 2, v], 1.0) for s, v in enumerate(vals)] for m, vals in finals.items()}
    result = _result([0.3, 0.5])
    result["runs"], result["summary"] = runs, equal_compute.summarise(runs, 6.0, 7.0)
    result["details"].update(cache_build_cpu_s=5.2, threads=1)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "equal_compute.json").write_text(json.dumps(result))
    text = " ".join(SECTIONS.get("bench-equal-compute")(tmp_path).split())
    assert "over 3 seed(s) (mean ± sd): scratch 30.0 ± 1.0, online 50.0 ± 2.0, cached 47.0 ± 2.0" in text
    assert "cached − online -3.0 ± 3.5 (beyond noise)" in text
    assert "online − scratch +20.0 ± 1.0 (beyond noise)" in text
    assert "built in 6 s (5 CPU s); 1 torch thread(s);" in text
    assert "does not reach the online student's final top-1 in 2 of 3 seed(s)" in text
    # seed 2: 49 ≥ 48 at step 20, 20 s of the online student's 20 s; + 6 s of build; B/16: 20/20 steps / 7
    assert ("the other(s) reach it at step 20: 1.00 (1.30 with the cache's build; B/16-shaped teacher 0.143) of the "
            "online student's wall-clock.") in text


def test_online_views_control_runs_the_teacher_on_the_caches_views(tmp_path: Path) -> None:
    """The control differs from the online student only in drawing K views per image (view 0 plain, as a cache
    stores them) instead of a fresh crop at every step; --modes must keep cached and online."""
    args = types.SimpleNamespace(work=str(tmp_path), steps=7, threads=0, override=[], views=2)
    online, control = (equal_compute.run_config(m, args, 3, tmp_path / "teacher", tmp_path / "cache")
                       for m in ("online", "online_views"))
    assert online.data.views is None and control.data.views == 2
    assert replace(control.data, views=None) == online.data and control.teacher == online.teacher
    assert equal_compute.modes_arg("cached, online,online_views") == ["cached", "online", "online_views"]
    for bad in ("cached,scratch", "cached,online,offline", "cached,online,online"):
        with pytest.raises(Exception, match="takes cached and online"):
            equal_compute.modes_arg(bad)
