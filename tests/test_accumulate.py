"""Exact accumulation (GradCache): ``train.accumulate: k`` with micro-batches of b gives the gradients of one batch
of k·b, to float64 precision, for every objective of the registry (each alone), a teacher ensemble, synthetic
captions with a frozen text tower, and an image forward masked by mfd (its masks replayed from the RNG).

Before (main 7b79a9b) each micro-batch computed its own loss on b samples: with ``clip`` the logged loss of
2 × 4 was the mean of two 4-sample losses, not the 8-sample loss (issue 19: 4.233 vs 2.382).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_dual_encoder

from mmkd.config import ConfigError, ObjectiveSpec, TrainConfig
from mmkd.data.batches import ImageBank, TrainBatch, TrainData
from mmkd.data.records import Record
from mmkd.models.student import feature_widths
from mmkd.objectives import OBJECTIVES, feature
from mmkd.objectives.base import Objective, ObjectiveContext, build_objectives
from mmkd.train.accumulate import accumulated_backward, merge, merge_targets, split
from mmkd.train.loop import train
from mmkd.train.task import DistillTask

S_DIM, T_DIM, T_FEAT = 16, 24, 40  # different widths: the objectives' learnable maps get gradients too
K, B, U = 3, 4, 2  # 3 micro-batches of 4 paired + 2 unpaired images
CPU = torch.device("cpu")


def _student(tok: str) -> Any:
    return tiny_dual_encoder(tok, dim=S_DIM, dropout=False).double()


def _ctx(student: Any) -> ObjectiveContext:
    return ObjectiveContext(S_DIM, T_DIM, feature_widths(student), {"image": T_FEAT, "text": T_FEAT},
                            teacher_logit_scale=20.0)


def _micro(i: int, g: torch.Generator, synthetic: bool = False) -> TrainBatch:
    n = B + U
    caps = [f"a photo of thing {i}-{j} " + "red " * (j % 3) for j in range(B)]
    return TrainBatch(pixel_values=torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
                      keys=[f"k{i}-{j}" for j in range(n)], views=[0] * n, captions=caps, n_paired=B,
                      paired_idx=np.arange(B), unpaired_idx=np.arange(U),
                      synthetic=[f"synthetic {i}-{j} blue" for j in range(n)] if synthetic else None)


def _targets(g: torch.Generator, synthetic: bool = False) -> dict[str, torch.Tensor]:
    n = B + U
    out = {"image_embeds": F.normalize(torch.randn(n, T_DIM, generator=g, dtype=torch.float64), dim=-1),
           "text_embeds": F.normalize(torch.randn(B, T_DIM, generator=g, dtype=torch.float64), dim=-1),
           "image_features": torch.randn(n, T_FEAT, generator=g, dtype=torch.float64),
           "text_features": torch.randn(B, T_FEAT, generator=g, dtype=torch.float64),
           "logit_scale": torch.tensor(20.0, dtype=torch.float64)}
    if synthetic:
        out["synthetic_text_embeds"] = F.normalize(torch.randn(n, T_DIM, generator=g, dtype=torch.float64), dim=-1)
        out["synthetic_text_features"] = torch.randn(n, T_FEAT, generator=g, dtype=torch.float64)
    return out


def _whole(micros: list[tuple[TrainBatch, Any]]) -> tuple[TrainBatch, Any]:
    """The one batch of k·b the micro-batches make up (paired images first, as a k·b batch lays them out)."""
    batches = [b for b, _ in micros]
    n = [b.n_paired for b in batches]
    syn = None
    if batches[0].synthetic is not None:
        syn = ([s for b in batches for s in b.synthetic[:b.n_paired]]
               + [s for b in batches for s in b.synthetic[b.n_paired:]])
    keys = [k for b in batches for k in b.keys[:b.n_paired]] + [k for b in batches for k in b.keys[b.n_paired:]]
    batch = TrainBatch(pixel_values=merge([b.pixel_values for b in batches], n), keys=keys, views=[0] * len(keys),
                       captions=[c for b in batches for c in b.captions], n_paired=sum(n),
                       paired_idx=np.arange(sum(n)), unpaired_idx=np.arange(len(keys) - sum(n)), synthetic=syn)
    return batch, merge_targets([t for _, t in micros], n)


def _grads(task: DistillTask, micros: list[tuple[TrainBatch, Any]], seed: int = 0
           ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    task = copy.deepcopy(task)
    task.train()
    torch.manual_seed(seed)
    terms = accumulated_backward(task, micros, "fp32", CPU)
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    return grads, {k: float(v) for k, v in terms.items()}


def _assert_same(acc: tuple[dict, dict], one: tuple[dict, dict], what: str) -> None:
    (ga, ta), (go, to) = acc, one
    assert set(ta) == set(to), what
    for k in to:
        assert ta[k] == pytest.approx(to[k], rel=1e-10, abs=1e-12), f"{what}: term {k}"
    assert set(ga) == set(go), f"{what}: {sorted(set(ga) ^ set(go))}"
    assert any(float(g.abs().max()) > 1e-6 for g in go.values()), f"{what}: no gradient at all"
    for name, g in go.items():
        torch.testing.assert_close(ga[name], g, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{what} {n}: {m}")


def _case(tok: str, specs: list[ObjectiveSpec], members: int = 1, synthetic: bool = False,
          frozen_text: bool = False) -> tuple[tuple[dict, dict], tuple[dict, dict], list]:
    student = _student(tok)
    if frozen_text:
        for p in student.text_model.parameters():
            p.requires_grad_(False)
    ctx = _ctx(student)
    objectives = build_objectives(specs, [ctx] * members if members > 1 else ctx, seed=0).double()
    task = DistillTask(student, objectives, synthetic_weight=0.7)
    g = torch.Generator().manual_seed(7)
    micros = []
    for i in range(K):
        batch = _micro(i, g, synthetic)
        targets = _targets(g, synthetic) if members == 1 else {"members": [_targets(g, synthetic)
                                                                              for _ in range(members)]}
        micros.append((batch, targets))
    return _grads(task, micros), _grads(task, [_whole(micros)]), micros


def _same_mask_for_every_image(batch: int, patches: int, mask_ratio: float, device: torch.device,
                               generator: Any = None) -> torch.Tensor:
    """mfd's patch choice, fixed per image: one batch of k·b draws other random masks than k batches of b, so
    the comparison holds the masks still (their replay is tested below)."""
    keep = max(1, round((1.0 - mask_ratio) * patches))
    return torch.arange(0, patches, max(1, patches // keep))[:keep].expand(batch, -1).to(device)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_accumulate_gives_the_gradients_of_the_whole_batch_for_every_objective(
        minilm_path: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feature, "keep_indices", _same_mask_for_every_image)
    acc, one, micros = _case(minilm_path, [ObjectiveSpec(name=name)])
    _assert_same(acc, one, name)


def test_accumulate_is_exact_for_an_ensemble_and_synthetic_captions_with_a_frozen_text_tower(
        minilm_path: str) -> None:
    specs = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="kl"), ObjectiveSpec(name="dr_clip"),
             ObjectiveSpec(name="fd_mse", towers=["image", "text"]), ObjectiveSpec(name="icl")]
    acc, one, _ = _case(minilm_path, specs, members=2)
    _assert_same(acc, one, "ensemble")
    acc, one, _ = _case(minilm_path, specs, members=2, synthetic=True)
    assert "synthetic/loss" in one[1]
    _assert_same(acc, one, "ensemble + synthetic captions")
    acc, one, _ = _case(minilm_path, specs[:1] + [ObjectiveSpec(name="rkd")], synthetic=True, frozen_text=True)
    assert not any(n.startswith("student.text_model.") for n in one[0])
    _assert_same(acc, one, "synthetic captions, frozen text tower")


def test_mfd_masks_replay_so_accumulation_stays_exact(minilm_path: str) -> None:
    """Three objectives on one masked forward: the k replays draw the same masks as the first pass."""
    specs = [ObjectiveSpec(name="mfd"), ObjectiveSpec(name="clip"), ObjectiveSpec(name="crd")]
    acc, _, micros = _case(minilm_path, specs)
    student = _student(minilm_path)
    task = DistillTask(student, build_objectives(specs, _ctx(student), seed=0).double())
    again = _grads(task, micros)  # the same seed: the same masks, the same gradients
    _assert_same(again, acc, "mfd replay")
    other = _grads(task, micros, seed=1)  # other masks: other gradients (the masks do matter)
    assert not torch.allclose(other[0]["student.visual_projection.weight"],
                              acc[0]["student.visual_projection.weight"])


def test_merge_and_split_are_inverse() -> None:
    parts = [torch.arange(6) + 10 * i for i in range(3)]  # 4 paired rows, 2 unpaired each
    whole = merge(parts, [4, 4, 4])
    assert whole.tolist()[:4] == [0, 1, 2, 3] and whole.tolist()[12:14] == [4, 5]
    for i in range(3):
        assert torch.equal(split(whole, [6, 6, 6], [4, 4, 4], i), parts[i])


# ---------------------------------------------------------------------------------------------------------
# the issue's example, through train(): the logged loss and the weights of 2 × 4 are those of batch 8


def _unit_records(n: int) -> list[Record]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return [Record(f"p{i}", images[i], (f"a photo of object {i} " + "big " * (i % 4),)) for i in range(n)]


def _train(tok: str, out: Path, batch: int, accumulate: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    student = tiny_dual_encoder(tok, dim=S_DIM, dropout=False).double()
    objectives = build_objectives([ObjectiveSpec(name="clip")], _ctx(student), seed=0).double()
    bank = ImageBank(_unit_records(16), 32, (0.5,) * 3, (0.25,) * 3)
    data = TrainData(bank, None, batch, 0, world=1, seed=0)
    cfg = TrainConfig(steps=2, lr=1e-3, warmup_steps=0, grad_clip=None, log_every=1, ckpt_every=0,
                      accumulate=accumulate, seed=0)
    train(student, objectives, data, None, cfg, out, progress=False, workers=0)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, {k: v.clone() for k, v in student.state_dict().items()}


def test_train_accumulate_two_by_four_is_batch_eight(minilm_path: str, tmp_path: Path) -> None:
    big, w_big = _train(minilm_path, tmp_path / "big", 8, 1)
    acc, w_acc = _train(minilm_path, tmp_path / "acc", 4, 2)
    for a, b in zip(acc, big):
        assert a["clip"] == pytest.approx(b["clip"], rel=1e-9)  # 7b79a9b: the mean of two 4-sample losses
    assert big[0]["clip"] > 1.5  # ≈ ln 8 at the start, far from a 4-sample loss's ≈ ln 4
    for k, v in w_big.items():
        if v.is_floating_point():
            torch.testing.assert_close(w_acc[k], v, rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")


class _RunsTheStudent(Objective):
    """A plugin whose loss is not a function of the student's outputs: accumulation cannot be exact for it."""

    exact_accumulation = False
    uses_teacher = False

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"x": student["image_embeds"].sum() * 0}


def test_an_objective_that_cannot_be_exact_is_refused_with_accumulation(minilm_path: str, tmp_path: Path) -> None:
    OBJECTIVES.register("runs_the_student_test")(_RunsTheStudent)
    try:
        student = tiny_dual_encoder(minilm_path, dim=S_DIM, dropout=False)
        objectives = build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="runs_the_student_test")],
                                      _ctx(student))
        data = TrainData(ImageBank(_unit_records(8), 32, (0.5,) * 3, (0.25,) * 3), None, 4, 0, world=1, seed=0)
        cfg = TrainConfig(steps=1, accumulate=2, warmup_steps=0, log_every=1, ckpt_every=0)
        with pytest.raises(ConfigError, match=r"train\.accumulate: 2 .*runs_the_student_test"):
            train(student, objectives, data, None, cfg, tmp_path / "out", progress=False, workers=0)
        assert not (tmp_path / "out" / "checkpoints").exists()
    finally:
        OBJECTIVES._items.pop("runs_the_student_test", None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_accumulate_under_autocast_and_the_grad_scaler(minilm_path: str, precision: str) -> None:
    """Mixed precision: the accumulated gradients (fp16: scaled by the grad scaler, then unscaled) agree with the
    whole batch's fp32 gradients to the precision's rounding."""
    student = tiny_dual_encoder(minilm_path, dim=S_DIM, dropout=False)
    specs = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="kl"), ObjectiveSpec(name="fd_mse")]
    task = DistillTask(student, build_objectives(specs, _ctx(student), seed=0)).train()
    g = torch.Generator().manual_seed(7)
    micros = [(_micro(i, g), _targets(g)) for i in range(K)]
    micros = [(replace(b, pixel_values=b.pixel_values.float()), {k: v.float() for k, v in t.items()})
              for b, t in micros]

    def flat(t: DistillTask) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in t.parameters() if p.grad is not None])

    ref = copy.deepcopy(task)
    accumulated_backward(ref, [_whole(micros)], "fp32", CPU)
    mixed = copy.deepcopy(task)
    # a small initial scale: at the default 2**16 fp16 overflows (the scaler would skip the step and lower it)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if precision == "fp16" else None
    accumulated_backward(mixed, micros, precision, CPU, scaler.scale if scaler is not None else lambda x: x)
    got = flat(mixed) / (scaler.get_scale() if scaler is not None else 1.0)
    assert torch.isfinite(got).all()
    assert float((got - flat(ref)).norm() / flat(ref).norm()) < 0.05


class _Vectors(torch.nn.Module):
    """A "student" whose outputs are free unit vectors (the issue's example): image i is row i of ``image``, caption
    "i" row i of ``text``; the pixels carry the row index."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor) -> None:
        super().__init__()
        self.image = torch.nn.Parameter(image)
        self.text_model = torch.nn.Module()
        self.text_model.rows = torch.nn.Parameter(text)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))  # CLIP init
        self.visual_projection = self.text_projection = torch.nn.Identity()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image[pixels[:, 0, 0, 0].long()]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[int(c)] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_model.rows[ids[:, 0]]


def test_the_issues_example_clip_on_unit_vectors_batch_8_vs_2_by_4() -> None:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    task = DistillTask(_Vectors(image, text), build_objectives([ObjectiveSpec(name="clip")], ObjectiveContext(16)))

    def batch(rows: range) -> TrainBatch:
        pix = torch.tensor(list(rows), dtype=torch.float64)[:, None, None, None].expand(-1, 3, 1, 1)
        return TrainBatch(pix, [str(i) for i in rows], [0] * len(rows), [str(i) for i in rows], len(rows),
                          np.arange(len(rows)), np.arange(0))

    one = _grads(task, [(batch(range(8)), {})])
    acc = _grads(task, [(batch(range(4)), {}), (batch(range(4, 8)), {})])
    _assert_same(acc, one, "clip on unit vectors")
    per_micro = [float(DistillTask(task.student, task.objectives)(batch(r), {})["clip"])
                 for r in (range(4), range(4, 8))]
    # 7b79a9b logged (and differentiated) the mean of the two 4-sample losses: 3.768 here against 5.041
    assert abs(sum(per_micro) / 2 - one[1]["clip"]) > 0.3
