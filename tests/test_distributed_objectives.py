"""Batch-relational objectives (crd, icl, gd and the others that compare samples with each other) under 2 gloo
processes equal the 1-process run on the same global batch: the same value of every term on every rank, and
the same DDP-synchronised gradients, the learnable width maps of icl and gd included.

Process plumbing and the tiny student come from test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_distributed import (
    BATCH,
    IMAGE_SIZE,
    MEAN,
    N_PAIRED,
    N_UNPAIRED,
    STD,
    STUDENT_DIM,
    TEACHER_DIM,
    UNPAIRED_BATCH,
    WORLD,
    FakeTeacher,
    _free_port,
    _gather_without_grad,
    _join_group,
    _records,
    _spawn,
    _tiny_student,
)
from torch import nn

from mmkd.config import ObjectiveSpec
from mmkd.data.batches import ImageBank, TrainBatch, TrainData
from mmkd.models.towers import tower_widths
from mmkd.objectives import contrastive, shared
from mmkd.objectives.base import ObjectiveContext, build_objectives
from mmkd.train.task import DistillTask

SPECS = [
    ObjectiveSpec(name="crd", weight=1.0),
    ObjectiveSpec(name="icl", weight=0.5),  # teacher width ≠ student width: learnable maps in DDP
    ObjectiveSpec(name="gd", weight=2.0),
    ObjectiveSpec(name="kl", weight=0.3, params={"temperature": 2.0}),
    ObjectiveSpec(name="afd", weight=0.3),
    ObjectiveSpec(name="rkd", weight=0.5),
    ObjectiveSpec(name="triplet", weight=0.2, params={"negatives": "semihard"}),
    ObjectiveSpec(name="siglip", weight=0.2),
]
MAP_PARAMS = ("objectives.objectives.1.width.maps.image.weight", "objectives.objectives.2.width.maps.text.weight")


class ScaledTeacher(FakeTeacher):
    """The fake teacher plus a logit scale, as the real targets carry one."""

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        return {**super().__call__(batch), "logit_scale": torch.tensor(20.0)}


def _run(tok_path: str, world: int, rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    student = _tiny_student(tok_path)
    objectives = build_objectives(SPECS, ObjectiveContext(STUDENT_DIM, TEACHER_DIM, tower_widths(student), {}))
    paired = _records(N_PAIRED, "p", True, seed=1)
    unpaired = _records(N_UNPAIRED, "u", False, seed=2)
    data = TrainData(ImageBank(paired, IMAGE_SIZE, MEAN, STD), ImageBank(unpaired, IMAGE_SIZE, MEAN, STD),
                     BATCH, UNPAIRED_BATCH, world=world, seed=0)
    teacher = ScaledTeacher([r.key for r in paired + unpaired], [r.captions[0] for r in paired])
    task = DistillTask(student, objectives)
    model: nn.Module = task
    if world > 1:
        model = nn.parallel.DistributedDataParallel(task, find_unused_parameters=False)
    batch = data.batch(0, rank)
    terms = model(batch, teacher(batch))
    terms["loss"].backward()
    return {"local": {k: float(v.detach()) for k, v in terms.items()},
            "grads": {n: p.grad.detach().clone() for n, p in task.named_parameters() if p.grad is not None}}


def _worker(rank: int, world: int, port: int, tok_path: str, out: str) -> None:
    _join_group(rank, world, port)
    result = {"ok": _run(tok_path, world, rank)}
    real = (shared.gather_with_grad, contrastive.gather_with_grad)
    shared.gather_with_grad = contrastive.gather_with_grad = _gather_without_grad
    try:
        result["broken"] = _run(tok_path, world, rank)
    finally:
        shared.gather_with_grad, contrastive.gather_with_grad = real
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_relational_objectives_two_processes_match_one_process(minilm_path: str, tmp_path: Path) -> None:
    _spawn(_worker, (WORLD, _free_port(), minilm_path, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = _run(minilm_path, 1, 0)

    expected_terms = {"crd/i2t", "crd/t2i", "icl/i2t", "icl/t2i", "gd/i2t_anchor", "gd/i2t_keys",
                      "gd/t2i_anchor", "gd/t2i_keys", "kl/i2t", "kl/t2i",
                      "afd/i2t", "afd/t2i", "rkd/distance_image", "rkd/angle_image", "rkd/distance_text",
                      "rkd/angle_text", "triplet", "siglip", "loss"}
    assert set(ref["local"]) == expected_terms
    # every term is computed on the gathered global batch: each rank has the 1-process value itself
    for r in ranks:
        for k, v in ref["local"].items():
            assert r["ok"]["local"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert all(v > 1e-6 for v in ref["local"].values())

    assert all(name in ref["grads"] for name in MAP_PARAMS)
    assert set(ranks[0]["ok"]["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        g0, g1 = ranks[0]["ok"]["grads"][name], ranks[1]["ok"]["grads"][name]
        torch.testing.assert_close(g1, g0, atol=1e-7, rtol=1e-6, msg=lambda m, n=name: f"{n} not synced: {m}")
        # float32 sums in a different order (n³ angle sums, softmaxes of gathered halves): compare per tensor
        # and gradients that are zero in exact arithmetic (attention key biases) are pure noise: an atol term
        diff, bound = float((g0 - g).norm()), 1e-4 * float(g.norm()) + 1e-6 * g.numel() ** 0.5
        assert diff <= bound, f"{name}: gradient difference {diff:.2e} > {bound:.2e}"

    # teeth: a gather that drops the other rank's gradients keeps the values but changes the gradients
    broken = ranks[0]["broken"]
    assert broken["local"]["crd/i2t"] == pytest.approx(ref["local"]["crd/i2t"], rel=1e-5)
    name = "student.visual_projection.weight"
    assert not torch.allclose(broken["grads"][name], ref["grads"][name], atol=1e-6, rtol=1e-4)
