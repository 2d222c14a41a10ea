"""A new user's first hour (issue 20): a finished run keeps its record, JSON is always valid, quiet
misconfigurations are named, and the messages a user reaches are ours."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_dual_encoder, write_run_config

from mmkd.cli import main


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A two-layer tiny teacher (conftest's run config keeps its layer 1)."""
    from mmkd.models.hub import save_dual_encoder

    return save_dual_encoder(tiny_dual_encoder(minilm_path, layers=2), tmp_path_factory.mktemp("t") / "teacher")


def _strict(text: str) -> object:
    """json.loads that refuses NaN/Infinity, as JSON itself (and every other reader) does."""
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_finished_run_resumed_keeps_its_record(teacher_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_run_config(tmp_path, teacher_dir)
    assert main(["distill", str(cfg)]) == 0
    record = tmp_path / "run" / "metrics.json"
    before = record.read_text()
    capsys.readouterr()
    assert main(["distill", str(cfg), "--resume"]) == 0
    assert "had already finished its 4 steps; its metrics.json is kept" in capsys.readouterr().out
    assert record.read_text() == before  # not "final_loss": NaN, not the resume's own seconds
    assert math.isfinite(_strict(before)["train"]["final_loss"])  # type: ignore[index]


def test_json_files_never_hold_nan(tmp_path: Path) -> None:
    from mmkd.fileio import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert _strict((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.5, None], "c": {"d": None}}
