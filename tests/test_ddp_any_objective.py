"""Data parallel training with any objective and any freeze (issue 19 item 2), and exact accumulation under it.

7b79a9b wrapped the task in DDP with ``find_unused_parameters=False``: a run stopped at step 2 wherever a trainable
parameter got no gradient (fd_* alone, rkd, cls_regression, kl/crd with a fixed scale, siglip with a non-SigLIP
student, mfd alone, ``towers: [image]``, ``level: features``). One torchrun launch (tests/ddp_variants.py) trains
every objective of the registry alone and the freeze/towers/level variants 3 steps each under 2 gloo processes,
then takes one accumulated step whose synchronised gradients must equal one process's on the whole batch.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ddp_variants import Teacher, setup, variants
from test_distributed import _free_port, _torchrun, torchrun_env

from mmkd.config import ObjectiveSpec
from mmkd.objectives import OBJECTIVES
from mmkd.train.accumulate import accumulated_backward
from mmkd.train.task import DistillTask


def test_every_objective_and_freeze_trains_under_two_processes_and_accumulation_is_exact(
        minilm_path: str, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent / "ddp_variants.py"
    cmd = [*_torchrun(), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script), minilm_path, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((tmp_path / "variants.json").read_text())
    assert set(OBJECTIVES.names()) <= set(results)  # the whole registry, each alone
    assert set(results) == {name for name, _, _ in variants()}
    failed = {k: v["error"] + "\n" + v.get("trace", "") for k, v in results.items() if not v["ok"]}
    assert not failed, "\n\n".join(f"{k}: {v}" for k, v in failed.items())
    for name, r in results.items():
        assert r["steps"] == 3 and r["moved"], name
        assert r["loss"] == r["loss"], f"{name}: NaN loss"

    # accumulation under 2 processes (2 micro-batches of 2 + 1 per rank) = 1 process on the batch of 8 + 4
    ranks = [torch.load(tmp_path / f"grads-rank{r}.pt", weights_only=True) for r in range(2)]
    specs = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="icl"), ObjectiveSpec(name="fd_mse", weight=0.5)]
    student, objectives, data = setup(minilm_path, specs, 1, 8, 4, double=True)
    task = DistillTask(student, objectives).train()
    batch = data.batch(0, 0)
    terms = accumulated_backward(task, [(batch, Teacher(torch.float64)(batch))], "fp32", torch.device("cpu"))
    ref = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    assert ranks[0]["terms"]["clip"] == pytest.approx(float(terms["clip"]), rel=1e-10)  # the 12-sample loss
    for r in ranks:
        assert set(r["grads"]) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, n=name: f"{n}: {m}")
