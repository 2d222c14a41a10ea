"""bench/recipes.py: its rows are the shipped recipes as documented, each differing from scratch only in what its
recipe changes; its cost per step and paired comparisons; the docs block rendered from its JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import recipes as bench  # noqa: E402

from mmkd.config import ObjectiveSpec  # noqa: E402
from mmkd.config_io import to_dict  # noqa: E402
from mmkd.eval.perimage import write_per_image  # noqa: E402
from mmkd.recipes import load_recipe  # noqa: E402
from mmkd.sweep import load_sweep  # noqa: E402


def _sets() -> dict[str, bench.DataSet]:
    args = argparse.Namespace(world_teacher="t/world", cifar_teacher="t/cifar", world_steps=7, cifar_steps=9,
                              cifar_train=100, datasets=["world", "cifar10"])
    return bench.datasets(args)


def _runs(tmp_path: Path, ds: bench.DataSet) -> dict[str, Any]:
    """The sweep bench/recipes.py writes for ``ds``, loaded by mmkd's sweep: its run config per row."""
    path = tmp_path / f"{ds.name}.yaml"
    path.write_text(yaml.safe_dump(bench.sweep_file(ds, ds.teacher, "c/k10", tmp_path / "work"), sort_keys=False))
    sweep = load_sweep(path)
    assert sweep.baseline == "recipe-scratch"
    return {r.point.removeprefix("recipe-"): r.cfg for r in sweep.runs}


def _recipe_objectives(name: str) -> list[ObjectiveSpec]:
    return [ObjectiveSpec(o["name"], o.get("weight", 1.0), o.get("towers"), o.get("params") or {})
            for o in load_recipe(name).config["objectives"]]


@pytest.mark.parametrize("name", ["world", "cifar10"])
def test_rows_are_the_recipes_as_documented(tmp_path: Path, name: str) -> None:
    ds = _sets()[name]
    cfgs = _runs(tmp_path, ds)
    assert list(cfgs) == list(bench.ROWS)
    assert cfgs["scratch"].objectives == [ObjectiveSpec("clip")]
    for row in ("clip-kd", "tinyclip", "tinyclip-no-inherit", "mobileclip"):
        assert cfgs[row].objectives == _recipe_objectives(bench.RECIPE[row] or "")
    # drop the task loss: CLIP-KD's distillation terms only (fd_mse at 2000, icl), the contrastive loss gone
    assert [(o.name, o.weight) for o in cfgs["clip-kd-no-task"].objectives] == [("fd_mse", 2000.0), ("icl", 1.0)]
    # inherit: both towers from the teacher, the chosen ViT layers, the teacher's projections
    tiny = cfgs["tinyclip"].student
    assert tiny.vision.source == tiny.text.source == "teacher" and tiny.init_projections_from_teacher
    assert tiny.vision.keep_layers == ds.inherit_layers
    assert len(ds.inherit_layers) == ds.vision["num_hidden_layers"]  # the scratch student's depth
    # not inherit: the scratch student, fresh ViT and projections
    assert cfgs["tinyclip-no-inherit"].student == cfgs["scratch"].student
    assert cfgs["scratch"].student.vision.source == "new" and not cfgs["scratch"].student.init_projections_from_teacher
    # MobileCLIP: a 10-view teacher cache, its views replayed
    mobile = cfgs["mobileclip"]
    assert mobile.teacher == "cache:c/k10" and mobile.data.augment and mobile.data.views == bench.VIEWS == 10


@pytest.mark.parametrize("name", ["world", "cifar10"])
def test_each_row_differs_from_scratch_only_in_what_its_recipe_changes(tmp_path: Path, name: str) -> None:
    cfgs = _runs(tmp_path, _sets()[name])
    plain = {row: {k: v for k, v in to_dict(c).items() if k != "out"} for row, c in cfgs.items()}
    expected = {"scratch": set(), "clip-kd": {"objectives"}, "clip-kd-no-task": {"objectives"},
                "tinyclip": {"objectives", "student"}, "tinyclip-no-inherit": {"objectives"},
                "mobileclip": {"objectives", "teacher", "data"}}
    for row, cfg in plain.items():
        assert {k for k in cfg if cfg[k] != plain["scratch"][k]} == expected[row], row
    data = {k for k in plain["mobileclip"]["data"] if plain["mobileclip"]["data"][k] != plain["scratch"]["data"][k]}
    assert data == {"augment", "views"}  # the same images, batch and captions; only the replayed views
    student = plain["tinyclip"]["student"]
    diff = {k for k in student if student[k] != plain["scratch"]["student"][k]}
    assert diff == {"vision", "text", "init_projections_from_teacher"}  # same projection width, same freezing


def test_step_ms_is_the_median_per_step_over_logging_intervals(tmp_path: Path) -> None:
    lines = [{"step": 20, "time_s": 4.0, "cpu_s": 3.0, "loss": 1.0},  # includes the first step's warm-up
             {"step": 25, "time_s": 4.1, "cpu_s": 3.05, "eval": {"top1": 0.5}},  # an evaluation line: not a step
             {"step": 40, "time_s": 6.0, "cpu_s": 5.0, "loss": 0.9},
             {"step": 60, "time_s": 8.2, "cpu_s": 7.2, "loss": 0.8}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ms = bench.step_ms(path)
    assert ms["cpu_ms"] == pytest.approx(110.0) and ms["wall_ms"] == pytest.approx(110.0)


def _run(folder: Path, top1: float, hits: list[bool]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"eval": {"zs": {"top1": top1}}}))
    write_per_image(folder, {"zs": np.array(hits)})


def test_paired_comparison_applies_the_sweep_noise_rule(tmp_path: Path) -> None:
    n = 200
    for i, seed in enumerate(["", "__seed-1", "__seed-2"]):
        a = [True] * (150 + i) + [False] * (n - 150 - i)  # 75-76% on every seed
        b = [True] * (100 - i) + [False] * (n - 100 + i)  # about 50%
        _run(tmp_path / f"recipe-x{seed}", sum(a) / n, a)
        _run(tmp_path / f"recipe-x-longer{seed}", 0.0, [False] * n)  # a row whose name starts like x: not x's
        _run(tmp_path / f"recipe-y{seed}", sum(b) / n, b)
    p = bench.paired(tmp_path, "x", "y")
    assert p["seeds"] == 3 and p["d_top1"] == pytest.approx(0.26) and p["beyond_noise"] is True
    assert 0 < p["d_top1_lo"] < p["d_top1"] < p["d_top1_hi"]
    same = bench.paired(tmp_path, "x", "x")
    assert same["d_top1"] == 0 and same["beyond_noise"] is False


def _result() -> dict[str, Any]:
    def row(top1: float, d: float | None, noise: bool | None, online: float | None) -> dict[str, Any]:
        return {"changes": "c", "zs_top1": top1, "zs_top1_sd": 0.01, "d_top1": d, "d_top1_sd": 0.01,
                "d_top1_lo": None if d is None else d - 0.02, "d_top1_hi": None if d is None else d + 0.02,
                "beyond_noise": noise, "step_cpu_ms": 100.0,
                "step_cpu_ms_teacher_online": None if online is None else 100.0 + online}
    rows = {"teacher": {"zs_top1": 0.6}, "scratch": row(0.30, None, None, None),
            "clip-kd": row(0.45, 0.15, True, 50.0), "clip-kd-no-task": row(0.20, -0.10, True, 50.0),
            "tinyclip": row(0.31, 0.01, False, 50.0)}
    pairs = [{"a": "clip-kd", "b": "clip-kd-no-task", "seeds": 3, "d_top1": 0.25, "d_top1_sd": 0.02,
              "d_top1_lo": 0.2, "d_top1_hi": 0.3, "beyond_noise": True}]
    ds = {"teacher": "t", "data": {"batch_size": 64, "world_size_train": 2000}, "steps": 400,
          "student_vision": {"num_hidden_layers": 2, "hidden_size": 256, "patch_size": 8}, "inherit_layers": [0, 7],
          "cache_build": {"wall_s": 90.0}, "rows": rows, "pairs": pairs,
          "teacher_forward": {"cpu_ms": 250.0, "batch": 64}}
    return {"command": "python bench/recipes.py --seeds 3", "seeds": 3, "views": 10, "seconds": 60, "train_s": 1500,
            "datasets": {"world": ds}}


def test_docs_block_renders_rows_and_generated_verdicts(tmp_path: Path) -> None:
    from readme_sections import SECTIONS

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "recipes.json").write_text(json.dumps(_result()))
    text = SECTIONS.get("recipes")(tmp_path)
    flat = " ".join(text.split())
    assert "| `clip-kd` | c | 45.0 ± 1.0 | +15.0 ± 1.0 | +13.0 to +17.0 | yes | 100 | 150 |" in text
    assert "| `scratch` | c | 30.0 ± 1.0 | | | | 100 | |" in text
    assert "Best: `clip-kd` (45.0 ± 1.0%, 75% of the teacher's)" in flat
    assert "step takes 100–100 ms" in flat and "batch of 64 takes 250 ms, 2.5× the scratch step" in flat
    assert "above scratch: `clip-kd`; below it: `clip-kd-no-task`." in flat
    assert "Keep the task loss? `clip-kd` − `clip-kd-no-task`: +25.0 ± 2.0 points" in flat
    assert "(3 seeds per row, one thread per run, 25 minutes of student training)" in flat
    assert "beyond noise." in flat and "Teacher `t`: 60.0%" in flat


def test_a_given_teacher_that_holds_no_model_is_refused_not_replaced(tmp_path: Path, monkeypatch: Any,
                                                                     capsys: Any) -> None:
    monkeypatch.setattr(sys, "argv", ["recipes.py", "--datasets", "world", "--world-teacher", str(tmp_path / "nope"),
                                      "--work", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--world-teacher" in err and "config.json" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "r.json").exists()  # nothing trained or written


def test_unknown_data_set_is_refused_naming_the_valid_ones(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setattr(sys, "argv", ["recipes.py", "--datasets", "world,imagenet"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and "world and/or cifar10" in capsys.readouterr().err
