"""Tests for mmkd.train.checkpoint and resuming mmkd.train.loop: a kill at any instant, even mid-write, leaves
the last complete checkpoint usable, and a resumed run ends with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_dual_encoder
from transformers import AutoTokenizer

from mmkd.config import ObjectiveSpec, TrainConfig
from mmkd.data import world
from mmkd.data.batches import ImageBank, TrainData
from mmkd.errors import RunStopped
from mmkd.models.dual_encoder import CLIP_MEAN, CLIP_STD, DualEncoder
from mmkd.objectives import ObjectiveContext, build_objectives
from mmkd.objectives.base import WeightedSum
from mmkd.teacher.targets import OnlineTeacher
from mmkd.train import checkpoint as checkpoint_module
from mmkd.train.checkpoint import CheckpointError, CheckpointManager, set_rng_state
from mmkd.train.loop import train

REAL_SAVE = torch.save


def state(step: int) -> dict[str, Any]:
    return {"weights": torch.full((3,), float(step)), "note": f"step {step}"}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------------
# the manager


def test_save_and_load_latest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ck", keep=3)
    assert mgr.load_latest() is None  # no folder yet
    path = mgr.save(5, state(5))
    assert path == tmp_path / "ck" / "step-00000005.pt" and path.is_file()
    assert (tmp_path / "ck" / "latest").read_text() == "step-00000005.pt"
    mgr.save(12, state(12))
    got = CheckpointManager(tmp_path / "ck").load_latest()  # a new process reads it
    assert got is not None and got["step"] == 12 and got["note"] == "step 12"
    assert torch.equal(got["weights"], torch.full((3,), 12.0))
    assert {"torch", "numpy", "python"} <= set(got["rng"])


def test_rng_state_is_restored(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    mgr.save(1, {})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(mgr.load_latest()["rng"])  # type: ignore[index]
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.parametrize("keep, expected", [(2, [4, 5]), (1, [5]), (0, [5]), (10, [1, 2, 3, 4, 5])])
def test_keep_n_prunes_older_checkpoints(tmp_path: Path, keep: int, expected: list[int]) -> None:
    mgr = CheckpointManager(tmp_path, keep=keep)
    for step in range(1, 6):
        mgr.save(step, state(step))
    assert names(tmp_path) == sorted([f"step-{s:08d}.pt" for s in expected] + ["latest"])
    assert mgr.load_latest()["step"] == 5  # type: ignore[index]


def test_pruning_orders_by_step_not_by_name(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (9, 100_000_000, 10):  # the widest step sorts first as a string
        mgr.save(step, state(step))
    remaining = {p.name for p in tmp_path.glob("step-*.pt")}
    assert remaining == {"step-100000000.pt", "step-00000010.pt"}


def test_truncated_checkpoint_falls_back_to_the_last_complete_one(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, state(1))
    newest = mgr.save(2, state(2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # an external process killed mid-copy, a full disk, ...
    got = mgr.load_latest()
    assert got is not None and got["step"] == 1 and torch.equal(got["weights"], torch.full((3,), 1.0))


def test_leftover_tmp_file_is_ignored(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, state(1))
    (tmp_path / ".step-00000002.pt.tmp-4242").write_bytes(b"half a checkpoint")
    (tmp_path / "step-00000003.pt.tmp").write_bytes(b"also not one")
    assert mgr.load_latest()["step"] == 1  # type: ignore[index]
    mgr.save(4, state(4))
    assert mgr.load_latest()["step"] == 4  # type: ignore[index]


@pytest.mark.parametrize("pointer", ["step-00000009.pt", "", "garbage\n", "../outside.pt"])
def test_pointer_to_missing_file_falls_back(tmp_path: Path, pointer: str) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    (tmp_path / "latest").write_text(pointer)
    assert mgr.load_latest()["step"] == 2  # type: ignore[index]


def test_pointer_to_corrupt_file_falls_back(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    (tmp_path / "step-00000002.pt").write_bytes(b"\x00" * 100)
    assert (tmp_path / "latest").read_text() == "step-00000002.pt"
    assert mgr.load_latest()["step"] == 1  # type: ignore[index]


def test_only_corrupt_checkpoints_are_an_error_naming_them(tmp_path: Path) -> None:
    (tmp_path / "step-00000001.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "step-00000002.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "latest").write_text("step-00000002.pt")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*step-00000002\.pt.*step-00000001\.pt"):
        CheckpointManager(tmp_path).load_latest()
    assert CheckpointManager(tmp_path / "none").load_latest() is None  # no checkpoint at all: None


def half_then_die(calls_before_death: int) -> Any:
    """A torch.save that works ``calls_before_death`` times, then writes half its bytes and dies."""
    calls = {"n": 0}

    def fake_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= calls_before_death:
            REAL_SAVE(obj, f, *args, **kwargs)
            return
        buf = io.BytesIO()
        REAL_SAVE(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise KeyboardInterrupt("killed while writing the checkpoint")

    return fake_save


def assert_latest_is_complete(folder: Path, step: int) -> None:
    """The pointer names a file that exists and loads, and the dying step left no file under its real name."""
    named = folder / (folder / "latest").read_text().strip()
    assert named.name == f"step-{step:08d}.pt" and named.is_file()
    assert torch.load(named, map_location="cpu", weights_only=True)["step"] == step
    got = CheckpointManager(folder).load_latest()
    assert got is not None and got["step"] == step


def test_kill_during_checkpoint_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(1, state(1))
    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_die(0))
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, state(2))
    assert not (tmp_path / "step-00000002.pt").exists()
    assert_latest_is_complete(tmp_path, 1)


# ----------------------------------------------------------------------------------------------------------
# end to end: interrupted and resumed training ends where an uninterrupted run does

STEPS = 8


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str) -> Any:
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def data() -> TrainData:
    records = world.to_records(world.generate(24, seed=0))
    bank = ImageBank(records, 32, CLIP_MEAN, CLIP_STD)
    return TrainData(bank, None, batch_size=8, unpaired_batch_size=0, world=1, seed=0)


@pytest.fixture(scope="module")
def teacher(tokenizer: Any, data: TrainData) -> OnlineTeacher:
    return OnlineTeacher(tiny_dual_encoder(tokenizer, dim=24, seed=100), data.paired, bf16=False)


def setup(tokenizer: Any, seed: int) -> tuple[DualEncoder, WeightedSum]:
    """A student and its objectives; the fd_mse term maps 16 → 24 dims with a learnable projection."""
    student = tiny_dual_encoder(tokenizer, dim=16, seed=seed)
    torch.manual_seed(seed + 1)
    objectives = build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse", weight=2.0)],
                                  ObjectiveContext(student_embed_dim=16, teacher_embed_dim=24))
    return student, objectives


def config(ckpt_every: int) -> TrainConfig:
    return TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=2, ckpt_every=ckpt_every, keep_checkpoints=2, log_every=1)


def run(tokenizer: Any, data: TrainData, teacher: OnlineTeacher, out: Path, seed: int = 0, ckpt_every: int = 3,
        **kwargs: Any) -> tuple[DualEncoder, WeightedSum, Any]:
    student, objectives = setup(tokenizer, seed)
    result = train(student, objectives, data, teacher, config(ckpt_every), out, progress=False, **kwargs)
    return student, objectives, result


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def straight(tokenizer: Any, data: TrainData, teacher: OnlineTeacher, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[DualEncoder, WeightedSum]:
    """Run A: 8 steps without interruption."""
    student, objectives, result = run(tokenizer, data, teacher, tmp_path_factory.mktemp("a"))
    assert result.steps == STEPS and result.resumed_from == 0
    return student, objectives


# a run really killed (SIGKILL) and resumed in a fresh process: tests/test_kills.py


def test_resume_without_checkpoint_starts_fresh(tokenizer: Any, data: TrainData, teacher: OnlineTeacher,
                                                straight: tuple[DualEncoder, WeightedSum], tmp_path: Path) -> None:
    student, _, result = run(tokenizer, data, teacher, tmp_path, resume=True)
    assert result.resumed_from == 0
    assert_same_weights(student, straight[0])


def test_kill_during_checkpoint_write_in_training(tokenizer: Any, data: TrainData, teacher: OnlineTeacher,
                                                  straight: tuple[DualEncoder, WeightedSum], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints every 2 steps; the write at step 4 dies half-way. Resume uses step 2 and still ends equal."""
    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_die(1))
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer, data, teacher, tmp_path, ckpt_every=2)
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert not (folder / "step-00000004.pt").exists()
    assert_latest_is_complete(folder, 2)
    student, objectives, result = run(tokenizer, data, teacher, tmp_path, seed=7, ckpt_every=2, resume=True)
    assert result.resumed_from == 2
    assert_same_weights(student, straight[0])
    assert_same_weights(objectives, straight[1])


@pytest.mark.parametrize("stop_at_call, finished", [(1, 0), (6, 5)])
def test_an_interrupted_run_carries_the_steps_it_finished(tokenizer: Any, data: TrainData, teacher: OnlineTeacher,
                                                         tmp_path: Path, stop_at_call: int, finished: int) -> None:
    """Ctrl-C inside a step (here: the teacher's call for it) raises RunStopped with the steps finished before it,
    wrapping the interrupt (a KeyboardInterrupt still, for code that catches those)."""
    calls = {"n": 0}

    def interrupting(batch: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            raise KeyboardInterrupt
        return teacher(batch)

    with pytest.raises(RunStopped) as stopped:
        run(tokenizer, data, interrupting, tmp_path)  # type: ignore[arg-type]
    assert stopped.value.step == finished and type(stopped.value.cause) is KeyboardInterrupt
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.__cause__ is stopped.value.cause


@pytest.fixture
def terminal_ctrl_c():
    """Python's own SIGINT handler for the test's duration. A background job (`cmd &` in a non-interactive shell,
    as some CI runners start the suite) begins with SIGINT ignored, and then there is no Ctrl-C to hold."""
    import signal

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, outer)


def test_a_ctrl_c_during_a_checkpoint_write_is_raised_once_the_checkpoint_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal_ctrl_c: None) -> None:
    """SIGINT inside torch.save would leave its zip writer half-done and replace the KeyboardInterrupt with the
    writer's own error; the save holds it until the checkpoint and `latest` are written, then raises it."""
    import os
    import signal

    from mmkd.fileio import ctrl_c_deferred
    from mmkd.train.checkpoint import read_checkpoint

    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("finished the block")
    assert done == ["finished the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    ckpts = CheckpointManager(tmp_path / "checkpoints")
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the write
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(3, {"task": {"w": torch.ones(2)}})
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000003.pt"
    assert torch.equal(read_checkpoint(tmp_path / "checkpoints" / "step-00000003.pt")["task"]["w"], torch.ones(2))
