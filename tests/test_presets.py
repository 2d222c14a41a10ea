"""Student presets: ``student: preset:NAME`` expands to a shipped recipe that keys and overrides refine."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmkd.config import ConfigError, StudentConfig, TowerSpec, load_config, student_presets


def _config(tmp_path: Path, student: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(f"teacher: some/teacher\nstudent: {student}\nobjectives: [{{name: clip}}]\n")
    return p


def test_presets_ship_and_expand(tmp_path: Path) -> None:
    assert {"half-depth", "half-depth-locked-text"} <= set(student_presets())
    cfg = load_config(_config(tmp_path, "preset:half-depth-locked-text"))
    assert cfg.student == StudentConfig(vision=TowerSpec("teacher"), text=TowerSpec("teacher"), freeze=["text_model"])


def test_preset_keys_and_overrides_refine_it(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "{preset: half-depth, projection_dim: 32, text: {keep_layers: [0, 5]}}"),
                      ["student.freeze=[]"])
    assert cfg.student.projection_dim == 32 and cfg.student.freeze == []
    assert cfg.student.text == TowerSpec("teacher", keep_layers=[0, 5]) and cfg.student.vision == TowerSpec("teacher")
    by_override = load_config(_config(tmp_path, "{}"), ["student=preset:half-depth"])
    assert by_override.student.freeze == ["text_model.embeddings.word_embeddings"]


def test_unknown_preset_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"student: unknown preset 'tiny'; valid: half-depth, half-depth-locked"):
        load_config(_config(tmp_path, "preset:tiny"))
