"""Runs are functions of their config: the same config and seed give the same losses and bit-identical weights on
CPU, for every kind of student (new, pretrained, shrunk from the teacher), with an online and a cached teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_runs import (
    assert_same_weights,
    losses,
    mmkd_ok,
    run_config,
    save_pretrained_towers,
    student,
    weights,
    write_pairs,
)

from mmkd.cli import main

pytestmark = pytest.mark.usefixtures("keep_threads")  # in-process runs set one torch thread


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, minilm_path: str, tiny_teacher_dir: Path) -> dict[str, Path]:
    """A saved teacher, its cache (2 views, so augmented training replays cached views), pretrained towers, data."""
    root = tmp_path_factory.mktemp("repro")
    pairs = write_pairs(root)
    teacher = tiny_teacher_dir
    vision, text = save_pretrained_towers(root / "towers", minilm_path)
    assert main(["cache", "--teacher", str(teacher), "--data", f"jsonl:{pairs}", "--out", str(root / "tc"),
                 "--views", "2", "--chunk-rows", "8", "--threads", "1"]) == 0
    return {"root": root, "pairs": pairs, "teacher": teacher, "cache": root / "tc", "vision": vision, "text": text}


def _config(world: dict[str, Path], tmp_path: Path, kind: str, teacher_kind: str, seed: int = 0) -> Path:
    teacher = str(world["teacher"]) if teacher_kind == "online" else f"cache:{world['cache']}"
    return run_config(tmp_path / f"{kind}-{teacher_kind}.yaml", teacher, world["pairs"], tmp_path / "unused",
                      student(kind, (world["vision"], world["text"])), seed=seed)


# a shrunk student needs the teacher's weights, which a cache does not hold (refused with a ConfigError elsewhere)
CASES = [("new", "online"), ("new", "cache"), ("pretrained", "online"), ("pretrained", "cache"), ("shrunk", "online")]


@pytest.mark.parametrize("kind, teacher_kind", CASES)
def test_same_config_same_losses_and_weights(world: dict[str, Path], tmp_path: Path, kind: str,
                                             teacher_kind: str) -> None:
    cfg = _config(world, tmp_path, kind, teacher_kind)
    # torch's global generator is in a different state before each run (as in two processes, or a sweep's runs)
    for i in (1, 2):
        torch.manual_seed(1000 * i)
        assert main(["distill", str(cfg), f"out={tmp_path / f'run{i}'}"]) == 0
    one, two = losses(tmp_path / "run1"), losses(tmp_path / "run2")
    assert len(one) == 3 and one == two
    assert_same_weights(tmp_path / "run1" / "student", tmp_path / "run2" / "student")
    # and the seed matters: another train.seed is another run
    assert main(["distill", str(cfg), f"out={tmp_path / 'other'}", "train.seed=1"]) == 0
    assert losses(tmp_path / "other") != one


@pytest.mark.slow
@pytest.mark.parametrize("teacher_kind", ["online", "cache"])
def test_same_config_same_weights_across_fresh_processes(world: dict[str, Path], tmp_path: Path,
                                                         teacher_kind: str) -> None:
    """torch seeds its generator from the OS at start-up: only fresh processes show what in-process state hides."""
    cfg = _config(world, tmp_path, "new", teacher_kind)
    for i in (1, 2):
        mmkd_ok("distill", str(cfg), f"out={tmp_path / f'run{i}'}")
    assert losses(tmp_path / "run1") == losses(tmp_path / "run2")
    assert_same_weights(tmp_path / "run1" / "student", tmp_path / "run2" / "student")
    # and the trained student is the one an in-process run of the same config gives
    assert main(["distill", str(cfg), f"out={tmp_path / 'here'}"]) == 0
    assert_same_weights(tmp_path / "run1" / "student", tmp_path / "here" / "student")
    assert weights(tmp_path / "here" / "student")  # not empty


def test_seeded_construction_leaves_the_global_generator_alone() -> None:
    """Seeding the init must not reseed the caller's generator (the training loop's draws stay its own)."""
    from mmkd.config import ObjectiveSpec
    from mmkd.objectives import ObjectiveContext, build_objectives

    ctx = ObjectiveContext(student_embed_dim=16, teacher_embed_dim=24)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = build_objectives([ObjectiveSpec(name="fd_mse")], ctx, seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = build_objectives([ObjectiveSpec(name="fd_mse")], ctx, seed=0)
    c = build_objectives([ObjectiveSpec(name="fd_mse")], ctx, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa and all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
