"""The CLI: distil from a config with overrides, evaluate, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_dual_encoder, write_run_config

from mmkd.cli import main
from mmkd.models.hub import save_dual_encoder


@pytest.fixture
def tiny_teacher(tmp_path: Path, minilm_path: str) -> Path:
    return save_dual_encoder(tiny_dual_encoder(minilm_path, layers=2), tmp_path / "teacher")


def write_config(tmp_path: Path, teacher: Path, extra: str = "") -> Path:
    evals = ('eval:\n  - {kind: zeroshot, data: "world:test", class_set: shape}\n'
             '  - {kind: retrieval, data: "world:test"}\n')
    return write_run_config(tmp_path, teacher, world_size=64, batch_size=16,
                            objectives="[{name: clip}, {name: fd_mse_cosine, towers: [image, text]}]",
                            train="steps: 4, log_every: 2, ckpt_every: 2, warmup_steps: 1", extra=evals + extra)


def test_distill_then_eval(tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    assert main(["distill", str(cfg), "train.steps=6"]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 6
    assert 0 <= metrics["eval"]["zeroshot:world:test:shape"]["top1"] <= 1
    assert "i2t_r1" in metrics["eval"]["retrieval:world:test"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("fd_mse_cosine/mse_image" in r for r in lines) and any("clip" in r for r in lines)
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", str(run / "student"), "--data", "world:test", "--class-set",
                 "colour", "--cache", str(tmp_path / "cache"), "--world-n", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["zeroshot"]) >= {"top1", "top5", "mean_per_class_recall"}


def test_unknown_config_key_is_named(tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    assert main(["distill", str(cfg), "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_unknown_loss_is_named(tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    assert main(["distill", str(cfg), "objectives.1.name=fd_msee"]) == 2
    err = capsys.readouterr().err
    assert "fd_msee" in err and "fd_mse_cosine" in err


def test_empty_caption_and_missing_image(tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"image": "missing.jpg", "captions": ["a cat"]}\n')
    cfg = write_config(tmp_path, tiny_teacher)
    assert main(["distill", str(cfg), f"data.train=jsonl:{data}"]) == 2
    err = capsys.readouterr().err
    assert "missing.jpg" in err and str(data) in err

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.jpg")
    data.write_text('{"image": "ok.jpg", "captions": ["  "]}\n')
    assert main(["distill", str(cfg), f"data.train=jsonl:{data}"]) == 2
    err = capsys.readouterr().err
    assert "caption" in err and "pairs.jsonl" in err


def test_unreadable_image_is_named(tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"image": "broken.jpg", "captions": ["a cat {i}"], "key": "k{i}"}}\n'
                            for i in range(20)))
    cfg = write_config(tmp_path, tiny_teacher)
    assert main(["distill", str(cfg), f"data.train=jsonl:{data}"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_teacher_without_weights(tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny_teacher / "model.safetensors").unlink()
    cfg = write_config(tmp_path, tiny_teacher)
    assert main(["distill", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(tiny_teacher) in err and "weights" in err
