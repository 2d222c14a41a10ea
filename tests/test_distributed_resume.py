"""Resume under torchrun (2 processes, gloo) after a real kill: the whole job (torchrun and both workers) is
SIGKILLed once its step-3 checkpoint is on disk; a fresh torchrun resumes it. Rank 0 alone chooses the
checkpoint (past a damaged newer file) and every rank loads that one; each rank gets back its own RNG state
(the student keeps dropout, so rank 1 drawing rank 0's masks would change the weights); the resumed job ends
bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_dual_encoder
from test_distributed import _free_port, _torchrun, torchrun_env
from tiny_runs import assert_same_weights

from mmkd.models.hub import save_dual_encoder
from mmkd.train.checkpoint import read_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc")]

STEPS = 8
DAMAGED_NOTE = "resuming from the older complete checkpoint"


def _config(root: Path, teacher: Path, out: Path) -> Path:
    config = {
        "teacher": str(teacher), "out": str(out), "cache_dir": str(root / "cache"),
        "student": {"projection_dim": 16},  # the teacher's towers (dropout on) with fresh 16-wide projections
        "data": {"train": "world:train", "world_size_train": 64, "batch_size": 16},
        "objectives": [{"name": "clip"}, {"name": "fd_mse_cosine", "towers": ["image", "text"]}],
        "train": {"steps": STEPS, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 1,
                  "keep_checkpoints": STEPS, "seed": 0},
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun_distill(config: Path, *extra: str) -> list[str]:
    return [*_torchrun(), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", "-m", "mmkd.cli", "distill", str(config), *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=torchrun_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave them running)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parent[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        children = [c for c, pp in parent.items() if pp == p]
        found += children
        todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_job_when(proc: subprocess.Popen[bytes], ready: Path, deadline_s: float = 180) -> None:
    """SIGKILL the workers and torchrun as soon as ``ready`` exists; fails if the job ends first."""
    end = time.monotonic() + deadline_s
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited ({proc.returncode}) before {ready.name} was written")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {ready.name} within {deadline_s} s")
        time.sleep(0.01)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2, f"torchrun's two workers not found below it: {workers}"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    end = time.monotonic() + 60
    while any(_alive(p) for p in workers):
        assert time.monotonic() < end, "torchrun's workers outlived SIGKILL"
        time.sleep(0.05)


def test_two_process_resume_follows_rank_0_and_restores_each_ranks_rng(minilm_path: str, tmp_path: Path) -> None:
    teacher = save_dual_encoder(tiny_dual_encoder(minilm_path, layers=2), tmp_path / "teacher")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_torchrun_distill(_config(tmp_path, teacher, straight)), tmp_path)

    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(_torchrun_distill(_config(tmp_path, teacher, killed)), cwd=tmp_path, env=torchrun_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _kill_job_when(proc, killed / "checkpoints" / "step-00000003.pt")
    assert not (killed / "student").exists()
    steps = sorted(int(p.stem.split("-")[1]) for p in (killed / "checkpoints").glob("step-*.pt"))
    last = steps[-1]
    assert 3 <= last < STEPS
    # a damaged newer file: rank 0 warns and picks `last`; rank 1 must load that file, not look for its own
    (killed / "checkpoints" / f"step-{last + 1:08d}.pt").write_bytes(b"damaged")

    resumed = _run(_torchrun_distill(_config(tmp_path, teacher, killed), "--resume"), tmp_path)
    assert resumed.stderr.count(DAMAGED_NOTE) == 1, resumed.stderr[-3000:]  # rank 0 chose, alone
    assert json.loads((killed / "metrics.json").read_text())["train"]["resumed_from"] == last
    ckpt = read_checkpoint(killed / "checkpoints" / f"step-{last:08d}.pt")
    assert len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])  # ranks differ
    assert_same_weights(killed / "student", straight / "student")

