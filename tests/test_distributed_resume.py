"""Resume under 2 processes (gloo): rank 0 chooses the checkpoint and every rank loads that same file; each
rank gets back its own RNG state; an interrupted + resumed 2-process run ends with the uninterrupted weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import WORLD, _free_port, _join_group, _setup, _spawn

from mmkd.config import TrainConfig
from mmkd.train.checkpoint import read_checkpoint
from mmkd.train.loop import train

pytestmark = pytest.mark.slow


def _cfg() -> TrainConfig:
    return TrainConfig(steps=4, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=2, keep_checkpoints=5, seed=0)


def _state(student: torch.nn.Module, objectives: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**{f"s.{k}": v.clone() for k, v in student.state_dict().items()},
            **{f"o.{k}": v.clone() for k, v in objectives.state_dict().items()}}


def _resume_worker(rank: int, world: int, port: int, tok_path: str, out: str) -> None:
    info = _join_group(rank, world, port)
    root = Path(out)
    student, objectives, data, teacher = _setup(tok_path, world)
    train(student, objectives, data, teacher, _cfg(), root / "a", info, progress=False)
    straight = _state(student, objectives)
    student, objectives, data, teacher = _setup(tok_path, world)
    train(student, objectives, data, teacher, _cfg(), root / "b", info, progress=False, stop_after=3)
    dist.barrier()
    if rank == 0:  # a planted, damaged newer file: rank 0 warns and picks step 2; rank 1 must follow it
        (root / "b" / "checkpoints" / "step-00000003.pt").write_bytes(b"damaged")
    dist.barrier()
    torch.manual_seed(99 + rank)  # a "new process": everything must come from the checkpoint
    student, objectives, data, teacher = _setup(tok_path, world)
    rng_at_start = {}
    result = train(student, objectives, data, teacher, _cfg(), root / "b", info, progress=False, resume=True,
                   on_start=lambda step: rng_at_start.update(step=step, torch=torch.get_rng_state()))
    torch.save({"straight": straight, "resumed": _state(student, objectives), "resumed_from": result.resumed_from,
                "rng_at_start": rng_at_start}, root / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_resume_follows_rank_0_and_restores_each_ranks_rng(minilm_path: str, tmp_path: Path) -> None:
    _spawn(_resume_worker, (WORLD, _free_port(), minilm_path, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ckpt = read_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000002.pt")
    assert len(ckpt["rng_ranks"]) == WORLD
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])  # ranks differ
    for r, got in enumerate(ranks):
        assert got["resumed_from"] == 2 and got["rng_at_start"]["step"] == 2
        assert torch.equal(got["rng_at_start"]["torch"], ckpt["rng_ranks"][r]["torch"])  # its own, not rank 0's
        for name, v in got["straight"].items():
            assert torch.equal(got["resumed"][name], v), name
