"""Recipes: ``recipe: NAME`` expands to a published method's objectives and settings; explicit keys win."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmkd.cli import main
from mmkd.config import ObjectiveSpec, load_config
from mmkd.recipes import RecipeError, recipe_names

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text("teacher: some/teacher\n" + body)
    return p


def test_recipes_expand_as_documented(tmp_path: Path) -> None:
    assert {"clip-kd", "tinyclip", "mobileclip"} <= set(recipe_names())
    # CLIP-KD: task loss + feature MSE at the paper's weight 2000 + interactive contrastive at 1, both towers
    cfg = load_config(_config(tmp_path, "recipe: clip-kd\n"))
    assert cfg.objectives == [ObjectiveSpec("clip", 1.0), ObjectiveSpec("fd_mse", 2000.0, ["image", "text"]),
                              ObjectiveSpec("icl", 1.0, ["image", "text"])]
    # TinyCLIP: affinity mimicking beside the task loss, towers and projections inherited from the teacher
    cfg = load_config(_config(tmp_path, "recipe: tinyclip\n"))
    assert [(o.name, o.weight) for o in cfg.objectives] == [("clip", 1.0), ("afd", 1.0)]
    assert cfg.student.vision.source == cfg.student.text.source == "teacher"
    assert cfg.student.init_projections_from_teacher
    # MobileCLIP: dr_clip, distillation only, on replayed views of a reinforced cache
    cfg = load_config(_config(tmp_path, "recipe: mobileclip\n"))
    assert cfg.data.augment and [o.name for o in cfg.objectives] == ["dr_clip"]
    assert cfg.objectives[0].params == {"contrastive_weight": 0.0, "distill_weight": 1.0,
                                        "average_after_softmax": True, "teacher_logit_scale": 100.0}


def test_every_recipe_names_registered_objectives_and_their_parameters(tmp_path: Path) -> None:
    from mmkd.objectives import OBJECTIVES
    from mmkd.objectives.base import objective_params

    for name in recipe_names():
        for o in load_config(_config(tmp_path, f"recipe: {name}\n")).objectives:
            assert set(o.params) <= set(objective_params(OBJECTIVES.get(o.name))), (name, o.name)


def test_explicit_keys_win_over_the_recipe(tmp_path: Path) -> None:
    body = ("recipe: mobileclip\ndata: {augment: false, batch_size: 16}\n"
            "objectives: [{name: dr_clip, params: {contrastive_weight: 1.0}}]\n")
    cfg = load_config(_config(tmp_path, body))
    assert not cfg.data.augment and cfg.data.batch_size == 16  # the file's keys
    assert cfg.objectives == [ObjectiveSpec("dr_clip", params={"contrastive_weight": 1.0})]  # a list: replaced
    # mappings merge key by key: the recipe's student keys stay where the file sets others
    cfg = load_config(_config(tmp_path, "recipe: tinyclip\nstudent: {vision: {keep_layers: [0, 5]}}\n"))
    assert cfg.student.vision.keep_layers == [0, 5] and cfg.student.vision.source == "teacher"
    # overrides refine the recipe's keys, and may name the recipe themselves
    cfg = load_config(_config(tmp_path, "recipe: clip-kd\n"), ["objectives.1.weight=1000"])
    assert [o.weight for o in cfg.objectives] == [1.0, 1000.0, 1.0]
    cfg = load_config(_config(tmp_path, "objectives: [{name: clip}]\n"), ["recipe=tinyclip"])
    assert [o.name for o in cfg.objectives] == ["clip"] and cfg.student.init_projections_from_teacher


def test_unknown_recipe_names_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RecipeError, match=r"recipe: unknown recipe 'clipkd'; valid: clip-kd, mobileclip, tinyclip"):
        load_config(_config(tmp_path, "recipe: clipkd\n"))
    assert main(["distill", str(_config(tmp_path, "recipe: clipkd\n"))]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'clipkd'; valid: clip-kd" in err and "Traceback" not in err


def test_mmkd_recipes_shows_what_each_expands_to(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        assert f"\n{name}: " in "\n" + out
    assert "name: fd_mse" in out and "weight: 2000.0" in out and "init_projections_from_teacher: true" in out
    reference = (REPO / "docs" / "configuration.md").read_text()  # the docs site's configuration reference
    assert all(f"| `{name}` |" in reference for name in recipe_names())  # each one documented
