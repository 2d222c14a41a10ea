"""Objectives that keep their names' promises: learnable scales that get a gradient wherever they start, and
feature losses whose space is stated (on unit vectors MSE is 2·(1 − cos); only raw vectors tell them apart),
with S1's comparison run where they differ. References for icl, gd and fd_mse: tests/test_objectives.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mmkd.config import ConfigError, ObjectiveSpec
from mmkd.objectives import OBJECTIVES
from mmkd.objectives.base import ObjectiveContext, build_objectives
from mmkd.sweep import load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N, DIM = 6, 5
SIGLIP_TEACHER_SCALE, SIGLIP_TEACHER_BIAS = 117.0, -12.5  # a SigLIP teacher's scale: above CLIP's cap of 100


def _ctx(**kw: Any) -> ObjectiveContext:
    return ObjectiveContext(DIM, DIM, {"image": DIM, "text": DIM}, {"image": DIM, "text": DIM}, **kw)


def _pairs(seed: int, scale_spread: float = 0.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """float64 student/teacher dicts; raw features get per-sample lengths in [1, 1 + scale_spread·…]."""
    g = torch.Generator().manual_seed(seed)

    def r(n: int = N) -> torch.Tensor:
        return torch.randn(n, DIM, generator=g, dtype=torch.float64)

    def lengths(n: int = N) -> torch.Tensor:
        return 1 + scale_spread * torch.rand(n, 1, generator=g, dtype=torch.float64)

    student = {"image_embeds": F.normalize(r(), dim=-1).requires_grad_(),
               "text_embeds": F.normalize(r(), dim=-1).requires_grad_(),
               "image_features": (r() * lengths()).requires_grad_(),
               "text_features": (r() * lengths()).requires_grad_(),
               "logit_scale": torch.tensor(20.0, dtype=torch.float64), "n_paired": N}
    teacher = {"image_embeds": F.normalize(r(), dim=-1), "text_embeds": F.normalize(r(), dim=-1),
               "image_features": r() * lengths(), "text_features": r() * lengths(),
               "logit_scale": torch.tensor(100.0, dtype=torch.float64),
               "sigmoid_logit_scale": torch.tensor(SIGLIP_TEACHER_SCALE, dtype=torch.float64),
               "logit_bias": torch.tensor(SIGLIP_TEACHER_BIAS, dtype=torch.float64)}
    return student, teacher


# ---------------------------------------------------------------------------------------------------------
# item 3: scales that learn


def _own_scales(obj: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in obj.named_parameters() if "scale" in n and p.requires_grad}


def test_every_objectives_own_scale_gets_a_gradient_at_initialisation_even_from_a_teacher_above_the_cap() -> None:
    """Each registered objective, built beside a SigLIP teacher whose scale (117) is above CLIP's cap: every
    learnable scale it owns has a non-zero gradient at its initial value."""
    ctx = _ctx(teacher_logit_scale=SIGLIP_TEACHER_SCALE, teacher_logit_bias=SIGLIP_TEACHER_BIAS)
    with_scales = {}
    for name in OBJECTIVES.names():
        cls = OBJECTIVES.get(name)
        variants = [{}, {"targets": "teacher"}] if name == "siglip" else [{}]
        for params in variants:
            obj = cls(ctx, list(cls.default_towers), **params).double()
            scales = _own_scales(obj)
            if not scales:
                continue
            with_scales[name] = scales
            student, teacher = _pairs(1)
            loss = sum(obj(student, teacher).values())
            grads = torch.autograd.grad(loss, list(scales.values()))
            for (pname, p), g in zip(scales.items(), grads):
                assert float(g.abs()) > 1e-8, f"{name}{params}: {pname} = {float(p.exp()):.1f} gets no gradient"
    assert {"siglip", "icl"} <= set(with_scales)  # the test has teeth: both objectives with their own scale
    # siglip starts at the teacher's scale itself, not at the cap
    siglip = OBJECTIVES.get("siglip")(ctx, ["image", "text"])
    assert float(siglip.log_scale.detach().exp()) == pytest.approx(SIGLIP_TEACHER_SCALE, rel=1e-6)


def test_siglip_student_identical_to_its_siglip_teacher_starts_at_the_optimum() -> None:
    """The student's scale and the teacher's targets use the same (uncapped) scale: a student whose embeddings
    equal its teacher's reproduces the teacher's probabilities, so nothing pulls it away (zero gradient)."""
    ctx = _ctx(teacher_logit_scale=SIGLIP_TEACHER_SCALE, teacher_logit_bias=SIGLIP_TEACHER_BIAS)
    obj = OBJECTIVES.get("siglip")(ctx, ["image", "text"], targets="teacher").double()
    assert float(obj.log_scale.detach().exp()) == pytest.approx(SIGLIP_TEACHER_SCALE, rel=1e-6)
    with torch.no_grad():  # the float32 initial value, exactly as float64 (the comparison below is to 1e-9)
        obj.log_scale.fill_(math.log(SIGLIP_TEACHER_SCALE))
    student, teacher = _pairs(2)
    # near-aligned pairs, so that scale 117 and 100 give visibly different probabilities
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(N, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.3 * torch.randn(N, DIM, generator=g, dtype=torch.float64), dim=-1)
    teacher.update(image_embeds=image, text_embeds=text)
    student.update(image_embeds=image.clone().requires_grad_(), text_embeds=text.clone().requires_grad_())
    loss = obj(student, teacher)["siglip"]
    grads = torch.autograd.grad(loss, [student["image_embeds"], student["text_embeds"], obj.log_scale, obj.bias])
    for g_ in grads:
        assert float(g_.abs().max()) < 1e-9


def test_icl_scale_is_held_at_the_cap_by_clamping_the_parameter_so_its_gradient_survives() -> None:
    obj = OBJECTIVES.get("icl")(_ctx(), ["image", "text"]).double()
    with torch.no_grad():
        obj.log_scale.fill_(math.log(150.0))  # e.g. after a step that pushed it past the cap
    student, teacher = _pairs(4)
    loss = sum(obj(student, teacher).values())
    assert float(obj.log_scale.detach().exp()) == pytest.approx(100.0, rel=1e-12)  # clamped, as CLIP clamps its own
    (g,) = torch.autograd.grad(loss, [obj.log_scale])
    assert float(g.abs()) > 1e-8
    # the value used is the clamped one: the same loss as a scale set at 100
    fresh = OBJECTIVES.get("icl")(_ctx(), ["image", "text"]).double()
    with torch.no_grad():
        fresh.log_scale.fill_(math.log(100.0))
    assert float(loss.detach()) == pytest.approx(float(sum(fresh(student, teacher).values()).detach()), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# item 6: the feature losses' two spaces


def _fd(name: str, **params: Any) -> torch.nn.Module:
    return OBJECTIVES.get(name)(_ctx(), ["image", "text"], **params).double()


def test_on_unit_embeddings_the_three_feature_losses_are_one_loss_rescaled() -> None:
    """‖s − t‖² = 2·(1 − cos) for unit vectors: fd_mse (mean over d dims) = 2/d · fd_cosine, and fd_mse_cosine
    (summed MSE) = 3 · fd_cosine, term by term, values and gradients."""
    student, teacher = _pairs(5)
    cos = _fd("fd_cosine")(student, teacher)
    mse = _fd("fd_mse")(student, teacher)
    both = _fd("fd_mse_cosine")(student, teacher)
    for tower in ("image", "text"):
        c = cos[f"cosine_{tower}"].detach()
        assert float(mse[f"mse_{tower}"].detach()) == pytest.approx(2 / DIM * float(c), rel=1e-12)
        assert float(both[f"mse_{tower}"].detach()) == pytest.approx(2 * float(c), rel=1e-12)
    leaves = [student["image_embeds"], student["text_embeds"]]
    g_cos = torch.autograd.grad(sum(cos.values()), leaves, retain_graph=True)
    g_mse = torch.autograd.grad(sum(mse.values()), leaves, retain_graph=True)
    g_both = torch.autograd.grad(sum(both.values()), leaves)
    for a, b, c in zip(g_cos, g_mse, g_both):
        torch.testing.assert_close(b, 2 / DIM * a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, 3 * a, rtol=1e-10, atol=1e-12)


def test_on_raw_features_mse_sees_lengths_and_differs_from_the_cosine_distance() -> None:
    student, teacher = _pairs(6, scale_spread=3.0)
    mse, cos = _fd("fd_mse", level="features", normalize=False), _fd("fd_cosine", level="features")
    m, c = ({k: v.detach() for k, v in d.items()} for d in (mse(student, teacher), cos(student, teacher)))
    # doubling the student's raw features changes MSE and leaves the cosine distance as it was
    doubled = {**student, "image_features": 2 * student["image_features"],
               "text_features": 2 * student["text_features"]}
    m2, c2 = ({k: v.detach() for k, v in d.items()} for d in (mse(doubled, teacher), cos(doubled, teacher)))
    for tower in ("image", "text"):
        assert float(c2[f"cosine_{tower}"]) == pytest.approx(float(c[f"cosine_{tower}"]), rel=1e-12)
        assert abs(float(m2[f"mse_{tower}"]) - float(m[f"mse_{tower}"])) > 0.1 * float(m[f"mse_{tower}"])
    # and no fixed factor links them: MSE / cosine differs between the towers and between inputs
    ratios = [float(m[f"mse_{t}"]) / float(c[f"cosine_{t}"]) for t in ("image", "text")]
    assert abs(ratios[0] - ratios[1]) > 0.05 * max(ratios)
    # the same vectors normalised: the identity is back
    unit = _fd("fd_mse", level="features", normalize=True, reduction="sum")(student, teacher)
    for tower in ("image", "text"):
        assert float(unit[f"mse_{tower}"].detach()) == pytest.approx(2 * float(c[f"cosine_{tower}"]), rel=1e-12)


def test_unnormalised_embeddings_are_refused_naming_the_level_to_use() -> None:
    """The models' embeddings are unit vectors: normalize: false at level: embeds would change nothing."""
    for name in ("fd_mse", "fd_cosine", "fd_mse_cosine"):
        with pytest.raises(ConfigError, match=rf"objectives\[0\] \({name}\): normalize: false needs level: features"):
            build_objectives([ObjectiveSpec(name=name, params={"normalize": False})], _ctx())
        build_objectives([ObjectiveSpec(name=name, params={"normalize": False, "level": "features"})], _ctx())


def test_s1_comparison_runs_its_feature_losses_where_they_differ() -> None:
    """configs/s1_compare.yaml's MSE, cosine and MSE+cosine students train on three different losses: no two
    are proportional on inputs whose raw lengths vary (on the unit embeddings all three were one loss), and
    MSE+cosine is exactly MSE plus cosine."""
    sweep = load_sweep(CONFIGS / "s1_compare.yaml")
    kd = {}
    for run in sweep.runs:
        if run.name.startswith("task-clip__kd-") and run.role == "distilled" and "kl" not in run.name:
            (spec,) = [o for o in run.cfg.objectives if o.name.startswith("fd_")]
            kd[run.name.removeprefix("task-clip__kd-")] = build_objectives([spec], _ctx()).double()
    assert set(kd) == {"mse", "cosine", "mse_cosine"}
    totals: dict[str, list[float]] = {k: [] for k in kd}
    for seed in (7, 8):
        student, teacher = _pairs(seed, scale_spread=3.0)
        for k, obj in kd.items():
            totals[k].append(float(obj(student, teacher)["loss"].detach()))
    for a in kd:
        for b in kd:
            if a < b:
                r0, r1 = totals[a][0] / totals[b][0], totals[a][1] / totals[b][1]
                assert abs(r0 - r1) > 0.02 * abs(r0), f"{a} and {b} are one loss rescaled ({r0:.4f}, {r1:.4f})"
    for i in range(2):
        assert totals["mse_cosine"][i] == pytest.approx(totals["mse"][i] + totals["cosine"][i], rel=1e-12)
