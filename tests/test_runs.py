"""Run folders belong to one run: refusal, --overwrite, --resume checks, damaged and planted checkpoints,
metrics without duplicate steps, one writer per folder, non-finite losses and weights (issue 11)."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_dual_encoder, write_run_config

from mmkd.cli import main
from mmkd.config import ConfigError, load_config
from mmkd.locking import FolderLock, FolderLockedError
from mmkd.models.hub import ModelLoadError, load_dual_encoder, save_dual_encoder
from mmkd.pipeline import run_distill
from mmkd.sweep import Sweep, run_sweep
from mmkd.train.checkpoint import CheckpointManager
from mmkd.train.runfolder import RESUMABLE_KEYS


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """Two layers, so the student can keep one of them."""
    return save_dual_encoder(tiny_dual_encoder(minilm_path, layers=2), tmp_path_factory.mktemp("t") / "teacher")


def write_config(tmp_path: Path, teacher: Path) -> Path:
    return write_run_config(tmp_path, teacher, objectives="[{name: clip}, {name: fd_mse}]",
                            train="steps: 4, log_every: 1, ckpt_every: 2, warmup_steps: 1, keep_checkpoints: 3")


def distill(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["distill", *args])
    return rc, capsys.readouterr().err


def steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resumable_keys_are_documented() -> None:
    guide = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()  # "Run folders, --resume"
    for key in RESUMABLE_KEYS:
        assert f"`{key}`" in guide, key


def test_a_folder_holding_another_run_is_refused_then_moved_aside_by_overwrite(
        tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    run = tmp_path / "run"
    assert distill(capsys, str(cfg))[0] == 0
    first = json.loads((run / "metrics.json").read_text())["run"]
    assert len(first["run_id"]) == 32 and first["fingerprints"]["teacher"] and first["fingerprints"]["data"]
    before = snapshot(run)
    # the same config again, or another one: refused, naming what is there; nothing touched
    for extra in ([], ["train.lr=0.01"]):
        rc, err = distill(capsys, str(cfg), *extra)
        assert rc == 2 and "already holds a run" in err and "checkpoints/step-00000004.pt" in err
        assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
        assert snapshot(run) == before
    rc, err = distill(capsys, str(cfg), "train.lr=0.01", "--overwrite")
    assert rc == 0, err
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert snapshot(old) == {k: v for k, v in before.items() if k != ".lock"}  # kept whole
    second = json.loads((run / "metrics.json").read_text())["run"]
    assert second["run_id"] != first["run_id"] and second["config_sha256"] != first["config_sha256"]
    assert "lr: 0.01" in (run / "config.yaml").read_text()


def test_resume_checks_the_config_extends_runs_and_keeps_metrics_without_duplicates(
        tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    run = tmp_path / "run"
    assert distill(capsys, str(cfg))[0] == 0
    rc, err = distill(capsys, str(cfg), "--resume", "train.lr=0.5", "data.batch_size=4")
    assert rc == 2 and "train.lr: checkpoint 0.001, config 0.5" in err and "data.batch_size" in err
    assert "train.steps" in err  # it says what may change
    # a kill after the step-2 checkpoint: steps 3-4 were logged but their checkpoint is gone
    (run / "checkpoints" / "step-00000004.pt").unlink()
    (run / "metrics.json").unlink()
    rc, err = distill(capsys, str(cfg), "--resume", "train.steps=6", "train.log_every=2")  # safe to change
    assert rc == 0, err
    assert steps(run) == [1, 2, 4, 6]  # lines after step 2 were dropped, not duplicated
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 6 and metrics["train"]["resumed_from"] == 2
    assert "steps: 6" in (run / "config.yaml").read_text()


def test_resume_without_a_checkpoint_fails_unless_asked_to_start(
        tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    rc, err = distill(capsys, str(cfg), "--resume")
    assert rc == 2 and "holds no checkpoint, so there is nothing to resume" in err
    assert not (tmp_path / "run").exists()  # no trace
    rc, err = distill(capsys, str(cfg), "--resume-or-start")
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["resumed_from"] == 0
    record = (tmp_path / "run" / "metrics.json").read_text()
    rc, err = distill(capsys, str(cfg), "--resume-or-start")  # now there is one: it continues (already done)
    assert rc == 0 and (tmp_path / "run" / "metrics.json").read_text() == record  # a finished run keeps its record


def test_a_failed_distill_leaves_no_trace(tmp_path: Path, tiny_teacher: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    rc, err = distill(capsys, str(cfg), f"data.train=jsonl:{tmp_path / 'missing.jsonl'}")
    assert rc == 2 and "missing.jsonl" in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # an existing empty folder stays empty: no config.yaml, no lock file
    assert distill(capsys, str(cfg), f"data.train=jsonl:{tmp_path / 'missing.jsonl'}")[0] == 2
    assert list((tmp_path / "run").iterdir()) == []


class Evil:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["raw pickle", "torch zip"])
def test_a_planted_malicious_checkpoint_never_runs(tmp_path: Path, tiny_teacher: Path, kind: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    assert distill(capsys, str(cfg), "train.steps=2")[0] == 0
    payload = {"step": 9, "task": {}, "x": Evil(marker)}
    if kind == "raw pickle":
        data = pickle.dumps(payload)
    else:
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
    evil = run / "checkpoints" / "step-00000009.pt"
    evil.write_bytes(data)
    # with an older good checkpoint: a warning naming both, resumed from the good one, the payload unread
    rc, err = distill(capsys, str(cfg), "--resume", "train.steps=3")
    assert rc == 0 and not marker.exists()
    assert f"{evil}: not a file of tensors and plain data" in err and "step-00000002.pt instead" in err
    # the planted file was not rotated away (never delete what we cannot read) and alone it fails clearly
    assert evil.is_file()
    for p in (run / "checkpoints").glob("step-0000000[0-8].pt"):
        p.unlink()
    rc, err = distill(capsys, str(cfg), "--resume", "train.steps=12")
    assert rc == 2 and not marker.exists()
    assert "no usable checkpoint" in err and str(evil) in err and "--overwrite" in err


def test_rotation_keeps_foreign_and_unreadable_checkpoints(tmp_path: Path) -> None:
    other = CheckpointManager(tmp_path, keep=5)
    other.save(100, {"w": torch.zeros(1)})
    other.save(200, {"w": torch.zeros(1)})
    (tmp_path / "step-00000050.pt").write_bytes(b"garbage")
    mine = CheckpointManager(tmp_path, keep=1)
    mine.save(1, {"w": torch.ones(1)})  # higher-numbered foreign files must not push this one out
    assert (tmp_path / "step-00000001.pt").is_file() and (tmp_path / "latest").read_text() == "step-00000001.pt"
    mine.save(2, {"w": torch.ones(1)})
    names = sorted(p.name for p in tmp_path.glob("step-*.pt"))
    assert names == ["step-00000002.pt", "step-00000050.pt", "step-00000100.pt", "step-00000200.pt"]


def test_checkpoints_load_with_weights_only(tmp_path: Path, tiny_teacher: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    assert distill(capsys, str(cfg), "train.steps=2")[0] == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert state["run"]["config"]["train"]["steps"] == 2 and len(state["rng_ranks"]) == 1
    assert isinstance(state["rng"]["python"], list) and isinstance(state["rng"]["numpy"], list)


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = load_config(write_config(tmp_path, tiny_teacher))
    with FolderLock(tmp_path / "run", "run folder"):
        with pytest.raises(FolderLockedError, match=rf"run folder is in use by another mmkd process \(PID "
                                                     rf"{os.getpid()}\)"):
            run_distill(cfg, progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()
    with FolderLock(tmp_path / "sweep", "sweep folder"):
        with pytest.raises(FolderLockedError, match=rf"sweep folder is in use .*PID {os.getpid()}"):
            run_sweep(Sweep(tmp_path / "sweep", [], {}), log=lambda m: None)


def test_a_diverging_run_stops_before_saving_anything(tmp_path: Path, tiny_teacher: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, tiny_teacher)
    rc, err = distill(capsys, str(cfg), "train.lr=1e30", "train.warmup_steps=0", "train.steps=6")
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert "the loss is not finite" in line and "loss=" in line and "clip=" in line and "fd_mse" in line
    assert line.split("step ")[1].split(":")[0].isdigit()
    run = tmp_path / "run"
    assert not (run / "student").exists() and not (run / "metrics.json").exists()
    for p in (run / "checkpoints").glob("step-*.pt"):  # whatever was saved before is finite
        state = torch.load(p, weights_only=True)
        assert all(bool(torch.isfinite(t).all()) for t in state["task"].values() if t.is_floating_point())


def test_a_model_with_non_finite_weights_is_refused(tmp_path: Path, tiny_teacher: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model = load_dual_encoder(tiny_teacher)
    with torch.no_grad():
        model.text_projection.weight[0, 0] = float("nan")
    bad = save_dual_encoder(model, tmp_path / "bad")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor text_projection\.weight holds non-finite"):
        load_dual_encoder(bad)
    capsys.readouterr()
    rc = main(["eval", "retrieval", "--model", str(bad), "--data", "world:test", "--world-n", "16",
               "--cache", str(tmp_path / "cache")])
    assert rc == 2 and "text_projection.weight holds non-finite values" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [("train.log_every=0", "train.log_every"),
                                           ("train.grad_clip=0", "train.grad_clip"),
                                           ("train.keep_checkpoints=0", "train.keep_checkpoints"),
                                           ("train.ckpt_every=-1", "train.ckpt_every")])
def test_train_settings_are_validated(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
    assert load_config(None, ["train.grad_clip=null"]).train.grad_clip is None  # null: no clipping
