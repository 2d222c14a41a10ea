"""Plugins: a user's own objective, data format and tower architecture, registered through ``mmkd.register_*``,
listed by ``mmkd.list_*`` and loaded by name from a config's ``plugins:``; the example runs end to end via the CLI."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_dual_encoder

import mmkd
from mmkd.cli import main
from mmkd.config import ConfigError, ObjectiveSpec, RunConfig, config_from_dict
from mmkd.config_io import to_dict
from mmkd.data.records import Record
from mmkd.data.sources import FORMATS, read_records
from mmkd.models.hub import save_dual_encoder
from mmkd.models.towers import ARCHS, build_tower, model_from_config
from mmkd.models.towers import config_from_dict as tower_config
from mmkd.objectives import OBJECTIVES, ObjectiveContext, build_objectives

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def registries() -> Iterator[None]:
    """Whatever a test registers is gone afterwards (the registries are process-wide)."""
    saved = [(r, dict(r._items)) for r in (OBJECTIVES, FORMATS, ARCHS)]
    yield
    for r, items in saved:
        r._items = items


def test_a_user_objective_is_registered_listed_and_built_by_name(registries: None) -> None:
    @mmkd.register_objective("test_norm_gap")
    class NormGap(mmkd.Objective):
        uses_teacher = False

        def __init__(self, ctx: ObjectiveContext, towers: list[str], *, scale: float = 1.0) -> None:
            super().__init__(ctx, towers)
            self.scale = scale

        def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
            return {"gap": self.scale * (student["image_embeds"].norm(dim=-1) - 1).abs().mean()}

    assert mmkd.list_objectives()["test_norm_gap"] == {"params": {"scale": 1.0}, "uses_teacher": False}
    total = build_objectives([ObjectiveSpec(name="test_norm_gap", params={"scale": 2.0})], ObjectiveContext(8))
    assert total.objectives[0].scale == 2.0
    with pytest.raises(ValueError, match="objective 'clip' is already registered"):
        mmkd.register_objective("clip")(NormGap)
    with pytest.raises(TypeError, match="not a subclass of mmkd.Objective"):
        mmkd.register_objective("test_not_one")(dict)


def test_a_user_format_reads_records_and_lists_its_options(registries: None, tmp_path: Path) -> None:
    @mmkd.register_format("testlines", class_names=lambda path: ["a", "b"])
    def read_lines(path: str, prefix: str = "") -> list[Record]:
        return [Record(key=f"k{i}", image=b"", captions=(prefix + line,), origin=f"{path}:{i + 1}")
                for i, line in enumerate(Path(path).read_text().splitlines())]

    (tmp_path / "c.txt").write_text("a red square\na blue disc\n")
    records = read_records(f"testlines:{tmp_path / 'c.txt'}", prefix="photo: ")
    assert [r.captions for r in records] == [("photo: a red square",), ("photo: a blue disc",)]
    assert mmkd.list_formats()["testlines"] == {"options": ["prefix"], "labelled": True}
    with pytest.raises(TypeError, match="first parameter must be 'path'"):
        mmkd.register_format("testbad")(lambda file: [])
    with pytest.raises(ValueError, match="format 'jsonl' is already registered"):
        mmkd.register_format("jsonl")(read_lines)


def test_a_user_tower_is_built_saved_and_loaded_by_its_config(registries: None) -> None:
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput

    class TinyConfig(PretrainedConfig):
        model_type = "mmkd_test_tiny"

        def __init__(self, hidden_size: int = 8, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.hidden_size = hidden_size

    class TinyTower(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config: TinyConfig) -> None:
            super().__init__(config)
            self.proj = torch.nn.Linear(3, config.hidden_size)

        def forward(self, pixel_values: torch.Tensor, **_: object) -> BaseModelOutput:
            return BaseModelOutput(last_hidden_state=self.proj(pixel_values.flatten(2).transpose(1, 2)))

    mmkd.register_tower("test_tiny", TinyConfig, "image", TinyTower)
    tower = build_tower("test_tiny", {"hidden_size": 12})
    assert isinstance(tower, TinyTower) and tower.config.hidden_size == 12
    assert mmkd.list_towers()["test_tiny"] == {"modality": "image", "config_class": "TinyConfig"}
    again = model_from_config(tower_config(tower.config.to_dict()))  # how a saved student's tower comes back
    assert isinstance(again, TinyTower) and again.config.hidden_size == 12
    with pytest.raises(ValueError, match="modality must be one of image, text"):
        mmkd.register_tower("test_other", TinyConfig, "audio")
    with pytest.raises(ValueError, match="tower 'vit' is already registered"):
        mmkd.register_tower("vit", TinyConfig, "image")


def test_plugins_are_modules_never_paths_and_their_failures_name_the_key(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"plugins\[0\]: 'examples/my_objective.py' is not a module name"):
        config_from_dict({"plugins": ["examples/my_objective.py"]})
    with pytest.raises(ConfigError, match=r"plugins\[1\]: no module named 'no_such_plugin_x'; put the folder"):
        config_from_dict({"plugins": ["json", "no_such_plugin_x"]})
    (tmp_path / "broken_plugin_x.py").write_text("import mmkd\nraise RuntimeError('half-written plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"plugins\[0\]: importing 'broken_plugin_x' failed: RuntimeError: half"):
        config_from_dict({"plugins": ["broken_plugin_x"]})
    # a config without plugins is written as before they existed: its hash, and so --resume, are unchanged
    assert "plugins" not in to_dict(RunConfig()) and to_dict(config_from_dict({"plugins": ["json"]}))["plugins"]


def test_a_plugin_path_on_the_command_line_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", str(EXAMPLES / "my_objective.yaml"), "plugins=[./my_objective.py]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "plugins[0]: './my_objective.py' is not a module name" in err and "\n" not in err


def test_mmkd_objectives_lists_a_plugins_objectives(registries: None, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "my_objective", raising=False)
    assert main(["objectives", "--plugin", "my_objective"]) == 0
    assert "angle_kd power=2.0" in capsys.readouterr().out.splitlines()
    monkeypatch.delitem(sys.modules, "my_objective", raising=False)  # the registry is restored: import it anew
    assert main(["objectives", "--plugin", "my_objective.py"]) == 2
    assert "--plugin[0]: 'my_objective.py' is not a module name" in capsys.readouterr().err


def test_the_public_api_is_typed_and_import_stays_light() -> None:
    for name in mmkd.__all__:
        obj = getattr(mmkd, name)
        if inspect.isfunction(obj):
            ret = inspect.signature(obj).return_annotation
            assert ret is not inspect.Signature.empty and "Any" not in str(ret), (name, ret)
    code = "import sys, mmkd; print('torch' in sys.modules, 'transformers' in sys.modules, callable(mmkd.list_towers))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]


def test_the_example_objective_runs_end_to_end_through_the_cli(tmp_path: Path, minilm_path: str) -> None:
    teacher = save_dual_encoder(tiny_dual_encoder(minilm_path, layers=2), tmp_path / "teacher")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT / "src")])}
    cmd = [sys.executable, "-m", "mmkd.cli", "distill", str(EXAMPLES / "my_objective.yaml"), f"teacher={teacher}",
           f"out={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.warmup_steps=1",
           "data.world_size_train=16", "data.batch_size=8", "eval.0.limit=16"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("angle_kd/angle_image" in r and "angle_kd/angle_text" in r for r in logged)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and "zeroshot:world:test:colour_shape" in metrics["eval"]


def test_a_global_plugin_is_imported_before_the_command_and_a_plugin_tower_without_it_is_one_line(
        registries: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        tiny_teacher_dir: Path) -> None:
    """`mmkd --plugin MODULE <command>` imports the module first, for any command (a saved model whose tower a
    plugin registers is read by eval/export/cache, which have no config to name it); a saved model whose tower
    no installed architecture knows is refused in one line naming its config.json and the option."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "my_objective", raising=False)
    assert main(["--plugin", "my_objective", "objectives"]) == 0
    assert "angle_kd power=2.0" in capsys.readouterr().out.splitlines()
    assert main(["--plugin", "no_such_plugin_x", "objectives"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--plugin[0]: no module named 'no_such_plugin_x'" in err and "\n" not in err

    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_teacher_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["model_type"] = "mmkd_unknown_tower"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "zeroshot", "--model", str(folder), "--data", "world:test", "--class-set", "colour",
                 "--cache", str(tmp_path / "cache"), "--world-n", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{folder / 'config.json'} vision_config: model_type 'mmkd_unknown_tower' is no architecture" in err
    assert "mmkd --plugin MODULE" in err and "\n" not in err
