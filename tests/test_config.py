"""Tests for mmkd.config: a typo in a run config must fail before compute is spent, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmkd.config import ConfigError, ObjectiveSpec, RunConfig, load_config
from mmkd.config_io import apply_overrides
from mmkd.objectives import OBJECTIVES, ObjectiveContext, build_objectives
from mmkd.objectives.base import check_specs

YAML = """\
teacher: runs/teacher
student:
  vision: {source: teacher, keep_layers: [0, 2]}
  text: {source: new, arch: bert, config: {hidden_size: 32, num_hidden_layers: 1}}
  projection_dim: 16
  freeze: [text_model]
data: {train: "world:train", batch_size: 8, limit: 100}
objectives:
  - {name: clip, weight: 1.0}
  - {name: fd_mse, weight: 2, towers: [image], params: {level: features}}
train: {steps: 20, lr: 0.01, grad_clip: null, bf16: true}
eval:
  - {kind: retrieval, data: "world:val"}
out: runs/x
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_loads_into_typed_dataclasses(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, YAML))
    assert isinstance(cfg, RunConfig)
    assert cfg.teacher == "runs/teacher"
    assert cfg.student.vision.source == "teacher" and cfg.student.vision.keep_layers == [0, 2]
    assert cfg.student.text.arch == "bert" and cfg.student.text.config == {"hidden_size": 32, "num_hidden_layers": 1}
    assert cfg.student.projection_dim == 16 and cfg.student.freeze == ["text_model"]
    assert cfg.data.batch_size == 8 and cfg.data.limit == 100
    assert [o.name for o in cfg.objectives] == ["clip", "fd_mse"]
    assert isinstance(cfg.objectives[1], ObjectiveSpec)
    assert cfg.objectives[1].weight == 2.0 and isinstance(cfg.objectives[1].weight, float)  # int promoted
    assert cfg.objectives[1].towers == ["image"] and cfg.objectives[1].params == {"level": "features"}
    assert cfg.train.steps == 20 and cfg.train.lr == 0.01 and cfg.train.grad_clip is None and cfg.train.bf16
    assert cfg.eval[0].kind == "retrieval" and cfg.eval[0].data == "world:val"
    assert cfg.train.warmup_steps == 50  # untouched keys keep their defaults


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg == RunConfig()


@pytest.mark.parametrize("text, key", [
    ("train: {stepz: 5}", "train.stepz"),
    ("student: {text: {sorce: new}}", "student.text.sorce"),
    ("objectives: [{name: clip, wieght: 2}]", "objectives[0].wieght"),
    ("teachr: x", "teachr"),
])
def test_unknown_key_names_the_dotted_path_and_the_valid_keys(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert repr(key) in msg
    if key == "train.stepz":
        assert "valid keys" in msg and "steps" in msg and "lr" in msg and "ckpt_every" in msg


@pytest.mark.parametrize("text, key, words", [
    ("train: {steps: many}", "train.steps", "integer"),
    ("train: {steps: 2.5}", "train.steps", "integer"),
    ("train: {lr: fast}", "train.lr", "number"),
    ("train: {bf16: 1}", "train.bf16", "true/false"),
    ("data: {batch_size: true}", "data.batch_size", "integer"),
    ("student: {freeze: text_model}", "student.freeze", "list"),
    ("student: {vision: {keep_layers: [0, x]}}", "student.vision.keep_layers[1]", "integer"),
    ("student: 3", "student", "mapping"),
])
def test_wrong_type_names_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert str(e.value).startswith(key + ":") and words in str(e.value)


def test_overrides_nested_scalars_and_lists(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, YAML), [
        "train.steps=7",
        "train.lr=1e-3",  # YAML 1.1 would read this as a string; a learning rate must be a number
        "student.vision.keep_layers=[1, 3]",
        "student.text.config.hidden_size=64",
        "objectives.1.weight=0.25",
        "objectives.1.params.level=embeds",
        "data.unpaired=world:pool",
        "train.grad_clip=null",
    ])
    assert cfg.train.steps == 7
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.student.vision.keep_layers == [1, 3]
    assert cfg.student.text.config == {"hidden_size": 64, "num_hidden_layers": 1}
    assert cfg.objectives[1].weight == 0.25 and cfg.objectives[1].params == {"level": "embeds"}
    assert cfg.objectives[0].weight == 1.0
    assert cfg.data.unpaired == "world:pool"
    assert cfg.train.grad_clip is None


def test_exponent_floats_in_yaml_files(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train: {lr: 3e-4, weight_decay: 1E-2}"))
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.weight_decay == pytest.approx(1e-2)


def test_override_of_an_unknown_key_is_caught_by_validation() -> None:
    with pytest.raises(ConfigError, match=r"'train\.stepz'"):
        load_config(None, ["train.stepz=3"])


@pytest.mark.parametrize("override, words", [
    ("train.steps", "key=value"),
    ("objectives.5.weight=1", "objectives.5.weight"),
    ("train.steps=[1,", "not valid YAML"),
])
def test_bad_overrides_are_config_errors(tmp_path: Path, override: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, YAML), [override])
    assert words in str(e.value)


def test_apply_overrides_edits_plain_dicts_in_place() -> None:
    data = {"a": {"b": [1, 2]}}
    out = apply_overrides(data, ["a.b.1=5", "a.c.d=x"])
    assert out is data and data == {"a": {"b": [1, 5], "c": {"d": "x"}}}


def test_unknown_objective_lists_valid_ones(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "objectives: [{name: clip}, {name: fd_msee}]"))  # the registry is above config
    with pytest.raises(ConfigError) as e:
        check_specs(cfg.objectives)  # run_distill and sweep call it before loading any model
    msg = str(e.value)
    assert "objectives[1].name" in msg and "fd_msee" in msg
    for name in OBJECTIVES.names():
        assert name in msg
    assert {"clip", "fd_mse", "fd_cosine", "fd_mse_cosine"} <= set(OBJECTIVES.names())


def test_bad_tower_name_in_objective(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"objectives\[0\]\.towers.*'audio'"):
        load_config(write(tmp_path, "objectives: [{name: fd_mse, towers: [image, audio]}]"))


@pytest.mark.parametrize("text, words", [
    ("train: {steps: 0}", "train.steps"),
    ("train: {lr: 0}", "train.lr"),
    ("data: {batch_size: 0}", "data.batch_size"),
    ("objectives: []", "objectives"),
    ("data: {views: 0}", "data.views"),
    ("teacher: 'cache:'", "needs the cache folder"),
    ("{teacher: 'cache:runs/tc', teacher_modality: image}", "teacher_modality: a teacher cache"),
    ("teacher_modality: text", "teacher_modality"),
])
def test_cross_field_validation(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(write(tmp_path, text))


def test_missing_file_and_non_mapping_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: {steps: [1,\n"))


def test_bad_objective_parameter_lists_valid_parameters() -> None:
    ctx = ObjectiveContext(student_embed_dim=8, teacher_embed_dim=8)
    with pytest.raises(ValueError) as e:
        build_objectives([ObjectiveSpec(name="fd_mse", params={"levle": "features"})], ctx)
    msg = str(e.value)
    assert "objectives[0]" in msg and "levle" in msg and "level=" in msg and "normalize=" in msg
    with pytest.raises(ValueError, match="temperature"):
        build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="clip", params={"temp": 0.1})], ctx)
    with pytest.raises(ConfigError, match="fd_mse_cosine"):  # the registry lists the valid names
        build_objectives([ObjectiveSpec(name="nope")], ctx)


def test_good_objective_parameters_reach_the_objective() -> None:
    ctx = ObjectiveContext(student_embed_dim=8, teacher_embed_dim=8)
    total = build_objectives([ObjectiveSpec(name="clip", weight=0.5, params={"temperature": 0.1}),
                              ObjectiveSpec(name="fd_cosine", towers=["text"],
                                            params={"normalize": False, "level": "features"})], ctx)
    clip, fd = total.objectives
    assert clip.temperature == 0.1 and total.weights == [0.5, 1.0]
    assert fd.towers == ["text"] and fd.normalize is False and fd.level == "features"
