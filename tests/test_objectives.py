"""Every objective against a separate, plainly written float64 reference (values and gradients), the mimicry
losses at zero when the student is the teacher, KL's temperature scaling, and hand-checked 3×3 cases.

The references below are written with explicit loops over samples and dimensions, sharing no code with
``mmkd.objectives``; gradients of both are taken with autograd with respect to the same raw inputs.
The last part holds fixed cases written against the objective classes directly: CLIP's symmetry, fixed
temperature and scale clamp, feature distillation without normalisation and with learnable width maps, the weighted sum.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_dual_encoder

from mmkd.config import ConfigError, ObjectiveSpec
from mmkd.objectives import OBJECTIVES
from mmkd.objectives.base import ObjectiveContext, WeightedSum, build_objectives, objective_params
from mmkd.objectives.contrastive import ClipObjective
from mmkd.objectives.feature import FdCosine, FdMse, FdMseCosine

N_PAIRED, N_UNPAIRED, DIM = 5, 2, 4


# ---------------------------------------------------------------------------------------------------------
# inputs


def _unit(v: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x / torch.sqrt(sum(x[k] ** 2 for k in range(x.shape[0]))) for x in v]


class Inputs:
    """Raw float64 leaves; the student/teacher dicts hold their normalised rows (as the training loop does)."""

    def __init__(self, seed: int = 0, n: int = N_PAIRED, u: int = N_UNPAIRED, dim: int = DIM,
                 teacher_dim: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        td = teacher_dim or dim
        self.si = torch.randn(n + u, dim, generator=g, dtype=torch.float64, requires_grad=True)
        self.st = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
        self.sif = torch.randn(n + u, dim, generator=g, dtype=torch.float64, requires_grad=True)
        self.stf = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
        self.log_scale = torch.tensor(math.log(3.0), dtype=torch.float64, requires_grad=True)
        self.ti = torch.randn(n + u, td, generator=g, dtype=torch.float64)
        self.tt = torch.randn(n, td, generator=g, dtype=torch.float64)
        self.tif = torch.randn(n + u, td, generator=g, dtype=torch.float64)
        self.ttf = torch.randn(n, td, generator=g, dtype=torch.float64)
        self.t_scale = torch.tensor(5.0, dtype=torch.float64)
        self.n = n

    def leaves(self) -> list[torch.Tensor]:
        return [self.si, self.st, self.sif, self.stf, self.log_scale]

    def student(self) -> dict[str, Any]:
        return {"image_embeds": F.normalize(self.si, dim=-1), "text_embeds": F.normalize(self.st, dim=-1),
                "image_features": self.sif, "text_features": self.stf, "logit_scale": self.log_scale.exp(),
                "n_paired": self.n}

    def teacher(self) -> dict[str, Any]:
        return {"image_embeds": F.normalize(self.ti, dim=-1), "text_embeds": F.normalize(self.tt, dim=-1),
                "image_features": self.tif, "text_features": self.ttf, "logit_scale": self.t_scale}

    # plain python views for the references
    def rows(self, name: str) -> list[torch.Tensor]:
        raw = {"si": self.si, "st": self.st, "ti": self.ti, "tt": self.tt}[name]
        return _unit([raw[i] for i in range(raw.shape[0])])


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[k] * b[k] for k in range(a.shape[0]))


def _build(name: str, towers: list[str] | None = None, s_dim: int = DIM, t_dim: int | None = DIM,
           feat_dims: dict[str, int] | None = None, **params: Any):
    ctx = ObjectiveContext(s_dim, t_dim, feat_dims or {"image": DIM, "text": DIM}, feat_dims or {"image": DIM,
                                                                                              "text": DIM})
    cls = OBJECTIVES.get(name)
    obj = cls(ctx, towers or list(cls.default_towers), **params)
    return obj.double()


def _check(obj: Any, inp: Inputs, reference: dict[str, torch.Tensor], atol: float = 1e-10) -> None:
    """Same terms, same values, and the same gradient of their sum w.r.t. every raw input."""
    terms = obj(inp.student(), inp.teacher())
    assert sorted(terms) == sorted(reference), (sorted(terms), sorted(reference))
    for k in reference:
        assert float(terms[k].detach()) == pytest.approx(float(reference[k].detach()), rel=1e-9, abs=atol), k
    leaves = inp.leaves()
    g_obj = torch.autograd.grad(sum(terms.values()), leaves, allow_unused=True)
    g_ref = torch.autograd.grad(sum(reference.values()), leaves, allow_unused=True)
    touched = 0
    for leaf, a, b in zip(("si", "st", "sif", "stf", "log_scale"), g_obj, g_ref):
        if b is None:
            assert a is None or float(a.abs().max()) < 1e-12, f"{leaf}: gradient where the reference has none"
            continue
        assert a is not None, f"{leaf}: no gradient, the reference has one"
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m, x=leaf: f"{x}: {m}")
        touched += float(b.abs().max()) > 1e-8
    assert touched, "the reference has no gradient at all: the comparison would prove nothing"


# ---------------------------------------------------------------------------------------------------------
# plain references


def _logsumexp(xs: list[torch.Tensor]) -> torch.Tensor:
    m = max(float(x.detach()) for x in xs)
    return m + torch.log(sum(torch.exp(x - m) for x in xs))


def _sim(a: list[torch.Tensor], b: list[torch.Tensor], scale: Any = 1.0) -> list[list[torch.Tensor]]:
    return [[scale * _dot(x, y) for y in b] for x in a]


def _transpose(m: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [list(col) for col in zip(*m)]


def _ce_rows(logits: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean over rows of -log softmax(row)[diagonal]."""
    return sum(_logsumexp(row) - row[i] for i, row in enumerate(logits)) / len(logits)


def _kl_rows(zs: list[list[torch.Tensor]], zt: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean over rows of KL(p_t ‖ p_s) = Σ_j p_t,j (log p_t,j − log p_s,j)."""
    total = 0.0
    for rs, rt in zip(zs, zt):
        ls, lt = _logsumexp(rs), _logsumexp(rt)
        total = total + sum(torch.exp(t - lt) * ((t - lt) - (s - ls)) for s, t in zip(rs, rt))
    return total / len(zs)


def ref_clip(inp: Inputs) -> dict[str, torch.Tensor]:
    z = _sim(inp.rows("si")[: inp.n], inp.rows("st"), inp.log_scale.exp())
    return {"clip": 0.5 * (_ce_rows(z) + _ce_rows(_transpose(z)))}


def _ref_triplet_dir(sim: list[list[torch.Tensor]], margin: float, mode: str) -> torch.Tensor:
    n = len(sim)
    if mode == "all":
        return sum(torch.relu(margin - sim[i][i] + sim[i][j]) for i in range(n) for j in range(n) if j != i) / (
            n * (n - 1))
    total = 0.0
    for i in range(n):
        negs = [sim[i][j] for j in range(n) if j != i]
        if mode == "hardest":
            neg = max(negs, key=lambda x: float(x.detach()))
        else:
            below = [s for s in negs if float(s.detach()) < float(sim[i][i].detach())]
            neg = max(below, key=lambda x: float(x.detach())) if below else min(negs, key=lambda x: float(x.detach()))
        total = total + torch.relu(margin - sim[i][i] + neg)
    return total / n


def ref_triplet(inp: Inputs, margin: float, mode: str) -> dict[str, torch.Tensor]:
    s = _sim(inp.rows("si")[: inp.n], inp.rows("st"))
    return {"triplet": 0.5 * (_ref_triplet_dir(s, margin, mode) + _ref_triplet_dir(_transpose(s), margin, mode))}


def ref_siglip(inp: Inputs, scale: float, bias: float) -> dict[str, torch.Tensor]:
    s = _sim(inp.rows("si")[: inp.n], inp.rows("st"))
    total = 0.0
    for i in range(inp.n):
        for j in range(inp.n):
            z = 1.0 if i == j else -1.0
            total = total + torch.log(1 + torch.exp(-z * (scale * s[i][j] + bias)))
    return {"siglip": total / inp.n}


def _sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum((a[k] - b[k]) ** 2 for k in range(a.shape[0]))


def ref_fd(inp: Inputs, kinds: tuple[str, ...], level: str = "embeds", mse_over_dims: str = "sum"
           ) -> dict[str, torch.Tensor]:
    """mse_over_dims: ``sum`` (squared L2 per sample) or ``mean`` (also divided by the width, torch's
    ``F.mse_loss`` as CLIP-KD's ``fd_loss`` uses it: winycg/CLIP-KD, src/open_clip/loss.py, KDClipLoss.forward)."""
    out = {}
    for tower, s_name, t_name in (("image", "si", "ti"), ("text", "st", "tt")):
        if level == "embeds":
            s, t = inp.rows(s_name), inp.rows(t_name)
        else:
            raw_s = inp.sif if tower == "image" else inp.stf
            raw_t = inp.tif if tower == "image" else inp.ttf
            s, t = _unit(list(raw_s)), _unit(list(raw_t))
        if "mse" in kinds:
            width = s[0].shape[0] if mse_over_dims == "mean" else 1
            out[f"mse_{tower}"] = sum(_sq(a, b) for a, b in zip(s, t)) / len(s) / width
        if "cosine" in kinds:
            out[f"cosine_{tower}"] = sum(1 - _dot(a, b) for a, b in zip(s, t)) / len(s)
    return out


def _pair_logits(inp: Inputs, s_scale: Any, t_scale: Any):
    zs = _sim(inp.rows("si")[: inp.n], inp.rows("st"), s_scale)
    zt = _sim(inp.rows("ti")[: inp.n], inp.rows("tt"), t_scale)
    return zs, zt


def ref_kl(inp: Inputs, temperature: float) -> dict[str, torch.Tensor]:
    zs, zt = _pair_logits(inp, inp.log_scale.exp() / temperature, inp.t_scale / temperature)
    t2 = temperature ** 2
    return {"i2t": t2 * _kl_rows(zs, zt), "t2i": t2 * _kl_rows(_transpose(zs), _transpose(zt))}


def ref_crd(inp: Inputs) -> dict[str, torch.Tensor]:
    zs, zt = _pair_logits(inp, inp.log_scale.exp(), inp.t_scale)
    return {"i2t": _kl_rows(zs, zt), "t2i": _kl_rows(_transpose(zs), _transpose(zt))}


def ref_afd(inp: Inputs, tau: float | None) -> dict[str, torch.Tensor]:
    scale = inp.t_scale if tau is None else 1.0 / tau
    zs, zt = _pair_logits(inp, scale, scale)
    return {"i2t": _kl_rows(zs, zt), "t2i": _kl_rows(_transpose(zs), _transpose(zt))}


def ref_icl(inp: Inputs, scale: Any) -> dict[str, torch.Tensor]:
    """CLIP-KD's icl_loss = (CE(s·I_s·T_tᵀ) + CE(s·T_s·I_tᵀ)) / 2 (winycg/CLIP-KD, src/open_clip/loss.py,
    KDClipLoss.forward), one half per term."""
    i2t = _sim(inp.rows("si")[: inp.n], inp.rows("tt"), scale)
    t2i = _sim(inp.rows("st"), inp.rows("ti")[: inp.n], scale)
    return {"i2t": _ce_rows(i2t) / 2, "t2i": _ce_rows(t2i) / 2}


def _one_way_grads_by_autograd(anchor: torch.Tensor, keys: torch.Tensor, scale: Any, create_graph: bool):
    """∂CE/∂(anchor, keys) of the one-way InfoNCE CE(scale·anchor·keysᵀ), mean over anchors, by autograd through
    a loop-written loss (no closed form): CLIP-KD's ``get_grad(p, k, tau, targets)`` with tau = 1/scale."""
    a, k = anchor.detach().clone().requires_grad_(True), keys.detach().clone().requires_grad_(True)
    if create_graph:  # keep the path from the student's raw inputs through these gradients
        a, k = anchor, keys
    rows_a, rows_k = [a[i] for i in range(a.shape[0])], [k[i] for i in range(k.shape[0])]
    loss = _ce_rows(_sim(rows_a, rows_k, scale))
    return torch.autograd.grad(loss, (a, k), create_graph=create_graph)


def _mse_elements(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.mse_loss's default: the mean over every element."""
    return sum(_sq(a[i], b[i]) for i in range(a.shape[0])) / (a.shape[0] * a.shape[1])


def ref_gd(inp: Inputs) -> dict[str, torch.Tensor]:
    """CLIP-KD's gd_loss (winycg/CLIP-KD, src/open_clip/loss.py, KDClipLoss.forward and get_grad): the gradients
    of the image→text loss w.r.t. its image anchors and caption keys and of the text→image loss w.r.t. its
    caption anchors and image keys, student vs teacher, each by F.mse_loss; each model at its own scale."""
    si = torch.stack(inp.rows("si")[: inp.n])
    st = torch.stack(inp.rows("st"))
    ti = torch.stack(inp.rows("ti")[: inp.n])
    tt = torch.stack(inp.rows("tt"))
    out = {}
    for direction, (sa, sk, ta, tk) in (("i2t", (si, st, ti, tt)), ("t2i", (st, si, tt, ti))):
        gs = _one_way_grads_by_autograd(sa, sk, inp.log_scale.exp(), create_graph=True)
        gt = _one_way_grads_by_autograd(ta, tk, inp.t_scale, create_graph=False)
        out[f"{direction}_anchor"] = _mse_elements(gs[0], gt[0])
        out[f"{direction}_keys"] = _mse_elements(gs[1], gt[1])
    return out


def _huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = torch.abs(a - b)
    return 0.5 * d ** 2 if float(d.detach()) < 1.0 else d - 0.5


def _ref_rkd_tower(s: list[torch.Tensor], t: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

    def dist(v: list[torch.Tensor], i: int, j: int) -> torch.Tensor:
        return torch.sqrt(_sq(v[i], v[j]))

    mu_s = sum(dist(s, i, j) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t, i, j) for i, j in pairs) / len(pairs)
    d = sum(_huber(dist(s, i, j) / mu_s, dist(t, i, j) / mu_t) for i, j in pairs) / len(pairs)

    def cos_angle(v: list[torch.Tensor], i: int, j: int, k: int) -> torch.Tensor:
        a, b = v[i] - v[j], v[k] - v[j]
        return _dot(a, b) / (torch.sqrt(_dot(a, a)) * torch.sqrt(_dot(b, b)))

    triples = [(i, j, k) for j in range(n) for i in range(n) for k in range(n) if len({i, j, k}) == 3]
    a = sum(_huber(cos_angle(s, i, j, k), cos_angle(t, i, j, k)) for i, j, k in triples) / len(triples)
    return d, a


def ref_rkd(inp: Inputs, wd: float, wa: float) -> dict[str, torch.Tensor]:
    out = {}
    for tower, sn, tn in (("image", "si", "ti"), ("text", "st", "tt")):
        d, a = _ref_rkd_tower(inp.rows(sn), inp.rows(tn))
        out[f"distance_{tower}"] = wd * d
        out[f"angle_{tower}"] = wa * a
    return out


def ref_cls_regression(inp: Inputs) -> dict[str, torch.Tensor]:
    target = _unit(list(inp.tif))
    img, cap = _unit(list(inp.sif)), _unit(list(inp.stf))
    return {"image": sum(_sq(a, b) for a, b in zip(img, target)) / len(img),
            "caption": sum(_sq(a, b) for a, b in zip(cap, target[: inp.n])) / len(cap)}


# ---------------------------------------------------------------------------------------------------------
# value and gradient checks, one per objective


@pytest.mark.parametrize("n", [2, 5])
def test_clip_matches_reference(n: int) -> None:
    inp = Inputs(1, n=n)  # unpaired images after the paired ones take no part (their gradient must be zero)
    _check(_build("clip"), inp, ref_clip(inp))


def test_clip_of_a_single_pair_is_zero() -> None:
    """One pair: each softmax has one entry, so the loss is exactly 0 (and finite), whatever the scale."""
    inp = Inputs(1, n=1)
    assert float(_build("clip")(inp.student(), inp.teacher())["clip"].detach()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("mode", ["all", "hardest", "semihard"])
def test_triplet_matches_reference(mode: str) -> None:
    inp = Inputs(2, n=6)
    _check(_build("triplet", margin=0.3, negatives=mode), inp, ref_triplet(inp, 0.3, mode))


def test_triplet_semihard_falls_back_to_the_easiest_negative() -> None:
    from mmkd.objectives.contrastive import triplet_from_similarities

    sim = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.9, 0.0], [0.4, 0.1, 0.5]], dtype=torch.float64)
    # row 0: every negative beats the positive → easiest (0.3); row 1: most similar below 0.9 → 0.2;
    # row 2: below 0.5 are 0.4 and 0.1 → 0.4.  hinge(m=0.2): 0.2-0.1+0.3=0.4, 0.2-0.9+0.2=0 → 0, 0.2-0.5+0.4=0.1
    assert float(triplet_from_similarities(sim, 0.2, "semihard")) == pytest.approx((0.4 + 0.0 + 0.1) / 3)


def test_siglip_matches_reference() -> None:
    inp = Inputs(3)
    obj = _build("siglip", init_scale=4.0, init_bias=-2.0)
    scale, bias = float(obj.log_scale.detach().exp()), float(obj.bias.detach())  # the float32 parameters
    assert scale == pytest.approx(4.0, rel=1e-6) and bias == -2.0
    _check(obj, inp, ref_siglip(inp, scale, bias))
    # its temperature and bias are parameters of the objective, so they train with the student
    assert {n for n, p in obj.named_parameters() if p.requires_grad} == {"log_scale", "bias"}


def _siglip_ctx(**kw: Any) -> ObjectiveContext:
    return ObjectiveContext(DIM, DIM, {"image": DIM, "text": DIM}, {"image": DIM, "text": DIM}, **kw)


def ref_siglip_soft(inp: Inputs, scale: Any, bias: Any, t_scale: float, t_bias: float) -> dict[str, torch.Tensor]:
    """Binary cross-entropy of every pair against the teacher's own sigmoid probability (its scale and bias)."""
    s = _sim(inp.rows("si")[: inp.n], inp.rows("st"))
    t = _sim(inp.rows("ti")[: inp.n], inp.rows("tt"))
    total = 0.0
    for i in range(inp.n):
        for j in range(inp.n):
            p = 1 / (1 + math.exp(-(t_scale * float(t[i][j]) + t_bias)))
            z = scale * s[i][j] + bias
            total = total - (p * torch.log(1 / (1 + torch.exp(-z))) + (1 - p) * torch.log(1 / (1 + torch.exp(z))))
    return {"siglip": total / inp.n}


def test_siglip_starts_from_a_siglip_teachers_scale_and_bias() -> None:
    obj = OBJECTIVES.get("siglip")(_siglip_ctx(teacher_logit_scale=117.0, teacher_logit_bias=-12.5), ["image", "text"])
    assert float(obj.log_scale.detach().exp()) == pytest.approx(117.0, rel=1e-6) and float(obj.bias.detach()) == -12.5
    plain = _build("siglip")  # a CLIP teacher (or none): SigLIP's own init
    assert float(plain.log_scale.detach().exp()) == pytest.approx(10.0) and float(plain.bias.detach()) == -10.0


def test_siglip_distils_the_teachers_probabilities_with_its_bias() -> None:
    inp = Inputs(4)
    obj = OBJECTIVES.get("siglip")(_siglip_ctx(teacher_logit_scale=7.0, teacher_logit_bias=-1.5), ["image", "text"],
                                   targets="teacher").double()
    assert obj.uses_teacher
    scale, bias = float(obj.log_scale.detach().exp()), float(obj.bias.detach())
    assert scale == pytest.approx(7.0) and bias == -1.5
    teacher = {**inp.teacher(), "sigmoid_logit_scale": torch.tensor(7.0, dtype=torch.float64),
               "logit_bias": torch.tensor(-1.5, dtype=torch.float64)}
    terms = obj(inp.student(), teacher)
    ref = ref_siglip_soft(inp, scale, bias, 7.0, -1.5)
    assert float(terms["siglip"].detach()) == pytest.approx(float(ref["siglip"].detach()), rel=1e-9)
    g, g_ref = (torch.autograd.grad(x["siglip"], [inp.si, inp.st]) for x in (terms, ref))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    # the teacher's bias matters: with another bias the targets, and so the loss, change
    other = obj(inp.student(), {**teacher, "logit_bias": torch.tensor(0.0, dtype=torch.float64)})["siglip"]
    assert abs(float(other.detach()) - float(terms["siglip"].detach())) > 1e-3


def test_siglip_with_a_siglip_student_trains_the_students_scale_and_bias() -> None:
    inp = Inputs(5)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    obj = OBJECTIVES.get("siglip")(_siglip_ctx(student_logit_bias=True), ["image", "text"]).double()
    assert not list(obj.parameters())  # the model's own scale and bias, saved with it
    terms = obj({**inp.student(), "logit_bias": bias}, inp.teacher())
    ref = ref_siglip(inp, inp.log_scale.exp(), bias)
    assert float(terms["siglip"].detach()) == pytest.approx(float(ref["siglip"].detach()), rel=1e-9)
    got = torch.autograd.grad(terms["siglip"], [inp.log_scale, bias])
    want = torch.autograd.grad(ref["siglip"], [inp.log_scale, bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    with pytest.raises(ConfigError, match="SigLIP student trains its own"):
        OBJECTIVES.get("siglip")(_siglip_ctx(student_logit_bias=True), ["image", "text"], init_bias=0.0)


def test_siglip_teacher_targets_need_a_siglip_teacher() -> None:
    with pytest.raises(ConfigError, match="needs a SigLIP teacher"):
        _build("siglip", targets="teacher")
    with pytest.raises(ConfigError, match="targets must be one of labels, teacher"):
        _build("siglip", targets="soft")


@pytest.mark.parametrize("name,kinds,over_dims", [("fd_mse", ("mse",), "mean"), ("fd_cosine", ("cosine",), ""),
                                                  ("fd_mse_cosine", ("mse", "cosine"), "sum")])
@pytest.mark.parametrize("level", ["embeds", "features"])
def test_feature_distillation_matches_reference(name: str, kinds: tuple[str, ...], over_dims: str, level: str
                                                ) -> None:
    inp = Inputs(4)
    _check(_build(name, level=level), inp, ref_fd(inp, kinds, level, over_dims))


@pytest.mark.parametrize("name,reduction", [("fd_mse", "sum"), ("fd_mse_cosine", "mean")])
def test_feature_mse_reduction_is_a_parameter(name: str, reduction: str) -> None:
    inp = Inputs(4)
    kinds = ("mse",) if name == "fd_mse" else ("mse", "cosine")
    _check(_build(name, reduction=reduction), inp, ref_fd(inp, kinds, "embeds", reduction))
    with pytest.raises(ValueError, match="reduction must be one of mean, sum, got 'max'"):
        _build(name, reduction="max")


def ref_clip_kd_fd(inp: Inputs) -> torch.Tensor:
    """CLIP-KD's ``fd_loss`` as its code writes it (winycg/CLIP-KD, src/open_clip/loss.py, KDClipLoss.forward):
    ``F.mse_loss(normalized student image, teacher image) + F.mse_loss(normalized student text, teacher text)``,
    F.mse_loss averaging over every element; spelt out with loops."""
    total = 0.0
    for s_name, t_name in (("si", "ti"), ("st", "tt")):
        s, t = inp.rows(s_name)[: inp.n], inp.rows(t_name)[: inp.n]
        d = s[0].shape[0]
        total = total + sum((a[k] - b[k]) ** 2 for a, b in zip(s, t) for k in range(d)) / (len(s) * d)
    return total


def test_fd_mse_is_clip_kds_feature_loss_so_its_weights_transfer() -> None:
    """fd_mse's two terms add up to CLIP-KD's fd_loss (a mean over samples and dimensions, not a sum over
    dimensions), so CLIP-KD's alpha_fd_loss 2000 means here what it means there."""
    inp = Inputs(4, u=0, dim=6)
    terms = _build("fd_mse", s_dim=6, t_dim=6)(inp.student(), inp.teacher())
    ref = ref_clip_kd_fd(inp)
    assert float(sum(terms.values()).detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    got = torch.autograd.grad(2000 * sum(terms.values()), [inp.si, inp.st])
    want = torch.autograd.grad(2000 * ref, [inp.si, inp.st])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_reference(temperature: float) -> None:
    inp = Inputs(5)
    _check(_build("kl", temperature=temperature), inp, ref_kl(inp, temperature))


def test_crd_matches_reference() -> None:
    inp = Inputs(6)
    _check(_build("crd"), inp, ref_crd(inp))


@pytest.mark.parametrize("tau", [None, 0.5])
def test_afd_matches_reference(tau: float | None) -> None:
    inp = Inputs(7)
    _check(_build("afd", temperature=tau), inp, ref_afd(inp, tau))


def test_icl_matches_reference() -> None:
    inp = Inputs(8)
    _check(_build("icl", temperature=0.25), inp, ref_icl(inp, 4.0))


def test_icl_with_its_learnt_scale_matches_clip_kds_average() -> None:
    inp = Inputs(8)
    obj = _build("icl")
    assert float(obj.log_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-6)  # CLIP-KD's init
    _check(obj, inp, ref_icl(inp, obj.log_scale.exp()))
    terms = obj(inp.student(), inp.teacher())
    (g,) = torch.autograd.grad(sum(terms.values()), [obj.log_scale])
    (g_ref,) = torch.autograd.grad(sum(ref_icl(inp, obj.log_scale.exp()).values()), [obj.log_scale])
    assert float(g) == pytest.approx(float(g_ref), rel=1e-8) and float(g) != 0.0


def test_gd_matches_clip_kds_four_gradients_built_on_autograd() -> None:
    inp = Inputs(9)
    _check(_build("gd"), inp, ref_gd(inp))
    image_only = _build("gd", towers=["image"])(inp.student(), inp.teacher())
    assert sorted(image_only) == ["i2t_anchor", "i2t_keys"]


def test_rkd_matches_reference() -> None:
    inp = Inputs(10, n=4, u=1)
    _check(_build("rkd", distance_weight=1.5, angle_weight=0.5), inp, ref_rkd(inp, 1.5, 0.5))


def test_cls_regression_matches_reference() -> None:
    inp = Inputs(11)
    _check(_build("cls_regression"), inp, ref_cls_regression(inp))


def test_every_registered_objective_is_checked_here() -> None:
    checked = {"clip", "triplet", "siglip", "fd_mse", "fd_cosine", "fd_mse_cosine", "kl", "crd", "afd", "icl",
               "gd", "rkd", "mfd", "cls_regression",
               "dr_clip"}  # against its own float64 reference in test_dr_clip.py
    assert set(OBJECTIVES.names()) == checked


# ---------------------------------------------------------------------------------------------------------
# student = teacher


def _same(seed: int = 12) -> Inputs:
    inp = Inputs(seed)
    inp.ti, inp.tt = inp.si.detach().clone(), inp.st.detach().clone()
    inp.tif, inp.ttf = inp.sif.detach().clone(), inp.stf.detach().clone()
    inp.t_scale = inp.log_scale.detach().exp()
    return inp


@pytest.mark.parametrize("name,params", [("fd_mse", {}), ("fd_cosine", {}), ("fd_mse_cosine", {}),
                                         ("fd_mse", {"level": "features"}), ("fd_cosine", {"level": "features"}),
                                         ("fd_mse_cosine", {"level": "features"}), ("kl", {"temperature": 3.0}),
                                         ("crd", {}), ("afd", {}), ("gd", {}), ("rkd", {})])
def test_mimicry_losses_are_zero_when_the_student_is_the_teacher(name: str, params: dict[str, Any]) -> None:
    inp = _same()
    terms = _build(name, **params)(inp.student(), inp.teacher())
    assert terms
    for k, v in terms.items():
        assert abs(float(v.detach())) < 1e-10, (name, k, float(v.detach()))
    # …and not zero otherwise (the test has teeth)
    other = Inputs(13)
    assert sum(float(v.detach()) for v in _build(name, **params)(other.student(), other.teacher()).values()) > 1e-4


def test_cls_regression_image_side_is_zero_when_the_student_outputs_the_teachers_cls() -> None:
    inp = Inputs(14)
    inp.tif = inp.sif.detach().clone()
    terms = _build("cls_regression")(inp.student(), inp.teacher())
    assert float(terms["image"].detach()) < 1e-12 and float(terms["caption"].detach()) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# KL's temperature


def test_kl_is_t_squared_times_the_softened_kl_and_its_gradient_has_hinton_high_temperature_limit() -> None:
    inp = Inputs(15)
    for temperature in (1.0, 4.0):
        terms = _build("kl", temperature=temperature)(inp.student(), inp.teacher())
        zs, zt = _pair_logits(inp, inp.log_scale.exp() / temperature, inp.t_scale / temperature)
        want = temperature ** 2 * float(_kl_rows(zs, zt).detach())
        assert float(terms["i2t"].detach()) == pytest.approx(want, rel=1e-9)

    # Hinton: for T → ∞, T²·KL → Σ (centred z_s − centred z_t)² / 2N per row, so the gradient w.r.t. the student's
    # logits tends to (centred z_s − centred z_t) / (n·N): the T² factor keeps it finite and T-independent.
    s_scale = float(inp.log_scale.detach().exp())
    si, st = F.normalize(inp.si[: inp.n], dim=-1), F.normalize(inp.st, dim=-1)
    ti, tt = F.normalize(inp.ti[: inp.n], dim=-1), F.normalize(inp.tt, dim=-1)
    zs, zt = s_scale * si @ st.t(), float(inp.t_scale) * ti @ tt.t()
    d_z = ((zs - zs.mean(1, keepdim=True)) - (zt - zt.mean(1, keepdim=True))) / (inp.n * inp.n)
    expected = torch.autograd.grad((d_z.detach() * zs).sum(), inp.si)[0]  # chain rule through z_s
    grads = {}
    for temperature in (1.0, 30.0, 3000.0):
        obj = _build("kl", towers=["image"], temperature=temperature)
        loss = obj(inp.student(), inp.teacher())["i2t"]
        grads[temperature] = torch.autograd.grad(loss, inp.si)[0]
    def rel_err(g: torch.Tensor) -> float:
        return float((g - expected).norm() / expected.norm())

    assert rel_err(grads[3000.0]) < 2e-3  # the error shrinks as 1/T (the logits are a few units here)
    assert rel_err(grads[30.0]) < 0.2
    assert rel_err(grads[1.0]) > 0.05  # at T = 1 it is a different thing
    # without the T² factor the gradient would be 10⁴ times smaller at T = 3000 than at T = 30
    ratio = grads[3000.0].norm() / grads[30.0].norm()
    assert 0.5 < float(ratio) < 2.0


def test_kl_argument_order_is_teacher_to_student() -> None:
    """KL(p_t ‖ p_s) = Σ p_t log(p_t / p_s): weighted by the teacher, not the (reverse) student-weighted sum."""
    inp = Inputs(16)
    value = float(_build("kl", towers=["image"], temperature=1.0)(inp.student(), inp.teacher())["i2t"].detach())
    zs, zt = _pair_logits(inp, inp.log_scale.exp(), inp.t_scale)
    forward_kl, reverse_kl = float(_kl_rows(zs, zt).detach()), float(_kl_rows(zt, zs).detach())
    assert value == pytest.approx(forward_kl, rel=1e-9)
    assert abs(forward_kl - reverse_kl) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# hand-checked 3×3 cases


def _identity_case(s_scale: float, t_scale: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """3 pairs whose image and caption embeddings are the unit vectors e1, e2, e3: cos = 1 on the diagonal, 0 off."""
    eye = torch.eye(3, dtype=torch.float64)
    student = {"image_embeds": eye.clone(), "text_embeds": eye.clone(),
               "logit_scale": torch.tensor(s_scale, dtype=torch.float64), "n_paired": 3}
    teacher = {"image_embeds": eye.clone(), "text_embeds": eye.clone(),
               "logit_scale": torch.tensor(t_scale, dtype=torch.float64)}
    return student, teacher


def test_crd_hand_checked_3x3() -> None:
    # Teacher logits ln2·I: each row's softmax is (e^{ln2}, 1, 1)/(2+1+1) = (1/2, 1/4, 1/4).
    # Student logits ln4·I: (4, 1, 1)/6 = (2/3, 1/6, 1/6).
    # KL(p_t ‖ p_s) per row = 1/2·ln((1/2)/(2/3)) + 2·1/4·ln((1/4)/(1/6)) = 1/2·ln(3/4) + 1/2·ln(3/2)
    #                       = 1/2·ln(9/8) ≈ 0.0588915; every row and both directions alike.
    student, teacher = _identity_case(math.log(4), math.log(2))
    terms = _build("crd", s_dim=3, t_dim=3)(student, teacher)
    assert float(terms["i2t"]) == pytest.approx(0.5 * math.log(9 / 8), rel=1e-12)
    assert float(terms["t2i"]) == pytest.approx(0.0588915, abs=1e-7)


def test_gd_hand_checked_3x3() -> None:
    # One-way loss CE(s·A·Kᵀ) over n = 3 anchors; with A = K = E: dL/dA = s·(P − E)·K/n = s·(P − E)/3, dL/dK the
    # same (P symmetric here). Teacher (s = ln2): P rows (1/2, 1/4, 1/4) → diagonal −ln2/6, off-diagonal ln2/12.
    # Student (s = ln4 = 2·ln2): P rows (2/3, 1/6, 1/6) → diagonal −2ln2/9, off ln2/9.
    # Difference: diagonal −ln2/18 (3 entries), off ln2/36 (6 entries); F.mse_loss, the mean of the 9 squares:
    # (3/324 + 6/1296)·ln²2 / 9 = ln²2/648 ≈ 0.00074144, for each of the four terms.
    student, teacher = _identity_case(math.log(4), math.log(2))
    terms = _build("gd", s_dim=3, t_dim=3)(student, teacher)
    assert sorted(terms) == ["i2t_anchor", "i2t_keys", "t2i_anchor", "t2i_keys"]
    for k, v in terms.items():
        assert float(v) == pytest.approx(math.log(2) ** 2 / 648, rel=1e-12), k
    assert float(terms["t2i_keys"]) == pytest.approx(0.00074144, abs=1e-8)


# ---------------------------------------------------------------------------------------------------------
# width maps, parameters, the registry


def test_icl_and_gd_map_student_embeddings_to_the_teachers_width() -> None:
    inp = Inputs(17, teacher_dim=6)
    for name in ("icl", "gd"):
        obj = _build(name, s_dim=DIM, t_dim=6)
        assert set(obj.width.maps) == {"image", "text"}
        terms = obj(inp.student(), inp.teacher())
        sum(terms.values()).backward()
        assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in obj.width.parameters())


def test_objective_parameters_are_keyword_only_and_validated() -> None:
    assert objective_params(OBJECTIVES.get("triplet")) == {"margin": 0.2, "negatives": "hardest"}
    assert objective_params(OBJECTIVES.get("kl"))["temperature"] == 2.0
    assert objective_params(OBJECTIVES.get("mfd"))["mask_ratio"] == 0.75  # CLIP-KD's
    ctx = ObjectiveContext(DIM, DIM)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['temp'\].*valid: temperature=2.0"):
        build_objectives([ObjectiveSpec(name="kl", params={"temp": 2})], ctx)
    with pytest.raises(ValueError, match=r"objectives\[0\] \(triplet\): triplet: negatives must be one of all, "
                                         r"hardest, semihard, got 'easy'; parameters \(defaults\): margin=0.2"):
        build_objectives([ObjectiveSpec(name="triplet", params={"negatives": "easy"})], ctx)
    with pytest.raises(ValueError, match=r"objectives\[1\] \(kl\): .*parameters \(defaults\): temperature=2.0"):
        build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="kl", params={"temperature": "hot"})], ctx)
    with pytest.raises(ValueError, match=r"objectives\[0\].name: unknown objective 'kd'; valid: afd, clip, cls_regr"):
        build_objectives([ObjectiveSpec(name="kd")], ctx)


def test_cli_lists_every_objective_with_its_parameters() -> None:
    proc = subprocess.run([sys.executable, "-m", "mmkd.cli", "objectives"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == OBJECTIVES.names()
    by_name = {line.split()[0]: line for line in lines}
    assert "margin=0.2" in by_name["triplet"] and "negatives='hardest'" in by_name["triplet"]
    assert "temperature=2.0" in by_name["kl"]
    assert "mask_ratio=0.75" in by_name["mfd"]


# ---------------------------------------------------------------------------------------------------------
# masked feature distillation on a real (tiny) CLIP vision tower


def _tiny_dual_encoder() -> Any:
    return tiny_dual_encoder(width=8, patch_size=4, image_size=16, dim=DIM).double()


def _manual_masked_pooled(model: Any, pixels: torch.Tensor, keep: list[list[int]]) -> torch.Tensor:
    """CLIP vision by hand: embeddings → keep CLS + chosen patches → pre-LN → encoder → post-LN of the CLS."""
    v = model.vision_model
    tokens = v.embeddings(pixels)
    rows = [torch.stack([tokens[b, 0]] + [tokens[b, 1 + p] for p in keep[b]]) for b in range(len(keep))]
    hidden = v.encoder(inputs_embeds=v.pre_layrnorm(torch.stack(rows))).last_hidden_state
    return v.post_layernorm(hidden[:, 0])


def test_mfd_drops_the_masked_patches_and_matches_a_hand_written_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmkd.objectives import feature

    model = _tiny_dual_encoder()
    pixels = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    keep = [[0, 5, 9, 15], [1, 2, 3, 4], [6, 7, 12, 14]]  # 4 of the 16 patches: mask_ratio 0.75
    monkeypatch.setattr(feature, "keep_indices", lambda b, p, r, device, generator=None: torch.tensor(keep))
    ref_feats = _manual_masked_pooled(model, pixels, keep)
    torch.testing.assert_close(feature.masked_image_features(model, pixels, 0.75), ref_feats, rtol=1e-10, atol=1e-12)
    # the hook is gone afterwards: the plain forward sees every patch again
    full = model.image_features(pixels)
    assert full.shape == ref_feats.shape and not torch.allclose(full, ref_feats)



def _count_image_forwards(model: Any) -> list[int]:
    calls = [0]
    model.vision_model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_mfd_is_clip_kd_one_masked_forward_that_every_objective_reads(monkeypatch: pytest.MonkeyPatch,
                                                                     minilm_path: str) -> None:
    """CLIP-KD (winycg/CLIP-KD src/training/train.py, train_kd_one_epoch): ``image_features, text_features,
    logit_scale = model(images, texts, distill=True, mask_ratio=args.mask_ratio)`` — the student runs ONCE, on
    masked images, and every loss (task, FD, ICL…) reads that output; mask 0.75 in its scripts. 7b79a9b ran a
    second, masked forward for the FD term alone (mask 0.5) and fed the other objectives the unmasked one."""
    from mmkd.data.batches import TrainBatch
    from mmkd.objectives import feature
    from mmkd.objectives.contrastive import clip_loss
    from mmkd.train.task import DistillTask

    model = tiny_dual_encoder(minilm_path, width=8, patch_size=4, image_size=16, dim=DIM, dropout=False).double()
    pixels = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    keep = [[0, 5, 9, 15], [1, 2, 3, 4], [6, 7, 12, 14]]  # 4 of the 16 patches: mask_ratio 0.75
    monkeypatch.setattr(feature, "keep_indices", lambda b, p, r, device, generator=None: torch.tensor(keep))
    ref_feats = _manual_masked_pooled(model, pixels, keep)
    ctx = ObjectiveContext(DIM, DIM, {"image": 8, "text": 8}, {"image": 8, "text": 8})
    objectives = build_objectives([ObjectiveSpec("mfd"), ObjectiveSpec("clip")], ctx).double()
    assert objectives.objectives[0].image_mask_ratio == 0.75
    task = DistillTask(model, objectives).train()
    calls = _count_image_forwards(model)
    teacher = {"image_embeds": F.normalize(torch.randn(3, DIM, dtype=torch.float64), dim=-1)}
    batch = TrainBatch(pixels, ["a", "b", "c"], [0, 0, 0], ["red", "green", "blue"], 3, np.arange(3), np.arange(0))
    terms = task(batch, teacher)
    assert calls[0] == 1  # one image forward for both objectives
    emb = _unit(list(model.visual_projection(ref_feats)))
    tgt = list(teacher["image_embeds"])
    # CLIP-KD's FD on the masked forward is F.mse_loss: the mean over samples *and* dimensions
    ref = sum(_sq(a, b) for a, b in zip(emb, tgt)) / (3 * DIM)
    assert float(terms["mfd/mse_image"]) == pytest.approx(float(ref.detach()), rel=1e-10)
    # the task loss reads the same masked forward
    tok = model.tokenize(batch.captions)
    text = F.normalize(model.text_projection(model.text_features(tok["input_ids"], tok["attention_mask"])), dim=-1)
    clip_ref = clip_loss(torch.stack(emb), text, model.logit_scale.exp().clamp(max=100))
    assert float(terms["clip"]) == pytest.approx(float(clip_ref.detach()), rel=1e-10)
    params = [p for p in model.parameters() if p.requires_grad]
    g_obj = torch.autograd.grad(terms["loss"], params, allow_unused=True)
    g_ref = torch.autograd.grad(ref + clip_ref, params, allow_unused=True)
    for a, b in zip(g_obj, g_ref):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    task.eval()  # evaluation sees whole images
    calls[0] = 0
    torch.testing.assert_close(task.outputs(batch)["image_features"], model.image_features(pixels))


def test_mfd_is_zero_without_masking_when_the_student_is_the_teacher_and_positive_with_it(minilm_path: str) -> None:
    from mmkd.data.batches import TrainBatch
    from mmkd.train.task import DistillTask

    model = tiny_dual_encoder(minilm_path, width=8, patch_size=4, image_size=16, dim=DIM, dropout=False).double()
    pixels = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        teacher = {"image_embeds": F.normalize(model.encode_image(pixels), dim=-1)}
    batch = TrainBatch(pixels, list("abcd"), [0] * 4, list("wxyz"), 4, np.arange(4), np.arange(0))
    ctx = ObjectiveContext(DIM, DIM)

    def mfd(ratio: float) -> float:
        task = DistillTask(model, build_objectives([ObjectiveSpec("mfd", params={"mask_ratio": ratio})], ctx)
                           .double()).train()
        return float(task(batch, teacher)["mfd/mse_image"])

    assert mfd(0.0) < 1e-20
    torch.manual_seed(1)
    assert mfd(0.5) > 1e-4
    two = build_objectives([ObjectiveSpec("mfd"), ObjectiveSpec("mfd", params={"mask_ratio": 0.5})], ctx)
    with pytest.raises(ConfigError, match="several image mask ratios"):  # one forward, one mask
        DistillTask(model, two)


def test_keep_indices_and_mfd_errors() -> None:
    from mmkd.objectives.feature import keep_indices, patch_embeddings_module

    g = torch.Generator().manual_seed(0)
    idx = keep_indices(8, 64, 0.75, torch.device("cpu"), g)
    assert idx.shape == (8, 16)
    assert all(row.tolist() == sorted(set(row.tolist())) for row in idx)
    assert len({tuple(row.tolist()) for row in idx}) == 8  # a different mask for every image
    assert keep_indices(2, 4, 0.99, torch.device("cpu"), g).shape == (2, 1)  # always at least one patch
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        _build("mfd", mask_ratio=1.0)
    ctx = ObjectiveContext(DIM, DIM, {"image": DIM, "text": DIM}, {"image": DIM, "text": DIM})
    assert build_objectives([ObjectiveSpec("mfd")], ctx).objectives[0].towers == ["image"]  # its default
    with pytest.raises(ValueError, match=r"objectives\[0\] \(mfd\): mfd masks image patches.*got towers "
                                         r"\['image', 'text'\]"):  # refused, not silently narrowed
        build_objectives([ObjectiveSpec("mfd", towers=["image", "text"])], ctx)
    from mmkd.models.towers import build_tower

    resnet = build_tower("resnet", dict(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(ValueError, match="needs a ViT-style vision tower"):
        patch_embeddings_module(resnet)


# ---------------------------------------------------------------------------------------------------------
# fixed cases against the objective classes directly (their own width)

LDIM = 6


def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _ctx(student_dim: int = LDIM, teacher_dim: int | None = LDIM, s_feats: dict[str, int] | None = None,
        t_feats: dict[str, int] | None = None) -> ObjectiveContext:
    return ObjectiveContext(student_dim, teacher_dim, s_feats or {}, t_feats or {})


# ----------------------------------------------------------------------------------------------------------
# clip: symmetric InfoNCE


def ref_clip_loops(image: list[list[float]], text: list[list[float]], scale: float) -> float:
    """The symmetric InfoNCE loss written out with loops in python floats."""
    n, d = len(image), len(image[0])
    logits = [[scale * sum(image[i][k] * text[j][k] for k in range(d)) for j in range(n)] for i in range(n)]
    i2t = sum(-logits[i][i] + math.log(sum(math.exp(x) for x in logits[i])) for i in range(n)) / n
    t2i = sum(-logits[j][j] + math.log(sum(math.exp(logits[r][j]) for r in range(n))) for j in range(n)) / n
    return 0.5 * (i2t + t2i)


def test_clip_is_symmetric_in_its_two_directions() -> None:
    """Swapping images and texts leaves the loss unchanged (both directions are averaged)."""
    image, text = unit_rows(6, LDIM, seed=1), unit_rows(6, LDIM, seed=2)
    scale = torch.tensor(10.0, dtype=torch.float64)
    obj = ClipObjective(_ctx(), ["image", "text"])
    a = obj({"image_embeds": image, "text_embeds": text, "logit_scale": scale, "n_paired": 6}, {})["clip"]
    b = obj({"image_embeds": text, "text_embeds": image, "logit_scale": scale, "n_paired": 6}, {})["clip"]
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert not obj.uses_teacher


def test_clip_fixed_temperature_and_scale_clamp() -> None:
    image, text = unit_rows(4, LDIM, seed=3), unit_rows(4, LDIM, seed=4)
    fixed = ClipObjective(_ctx(), ["image", "text"], temperature=0.05)
    big = torch.tensor(500.0, dtype=torch.float64, requires_grad=True)
    s = {"image_embeds": image, "text_embeds": text, "logit_scale": big, "n_paired": 4}
    assert fixed(s, {})["clip"].item() == pytest.approx(ref_clip_loops(image.tolist(), text.tolist(), 20.0), rel=1e-9)
    clamped = ClipObjective(_ctx(), ["image", "text"], max_logit_scale=100.0)
    loss = clamped(s, {})["clip"]
    assert loss.item() == pytest.approx(ref_clip_loops(image.tolist(), text.tolist(), 100.0), rel=1e-9)
    (g,) = torch.autograd.grad(loss, [big])
    assert g.item() == 0.0  # clamped: the scale gets no gradient above the cap


def test_clip_perfect_alignment_beats_random() -> None:
    aligned = unit_rows(8, LDIM, seed=5)
    scale = torch.tensor(50.0, dtype=torch.float64)
    obj = ClipObjective(_ctx(), ["image", "text"])
    good = obj({"image_embeds": aligned, "text_embeds": aligned, "logit_scale": scale, "n_paired": 8}, {})["clip"]
    bad = obj({"image_embeds": aligned, "text_embeds": unit_rows(8, LDIM, seed=6), "logit_scale": scale,
               "n_paired": 8}, {})["clip"]
    assert good.item() < bad.item()


# ----------------------------------------------------------------------------------------------------------
# feature distillation


def ref_normalize(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / max(norm, 1e-12) for x in v]


def ref_fd_lists(s: list[list[float]], t: list[list[float]], normalize: bool) -> dict[str, float]:
    """Per-sample squared L2 (summed over dims) and 1 - cosine, averaged over the teacher's rows."""
    s = s[: len(t)]
    if normalize:
        s, t = [ref_normalize(x) for x in s], [ref_normalize(x) for x in t]
    mse = sum(sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(s, t)) / len(t)
    cos = sum(1 - sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
              for x, y in zip(s, t)) / len(t)
    return {"mse": mse, "cosine": cos}


def fd_inputs(n_img: int = 6, n_txt: int = 4, s_dim: int = LDIM, t_dim: int = LDIM, seed: int = 0
              ) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    student = {"image_embeds": r(n_img, s_dim), "text_embeds": r(n_txt, s_dim), "image_features": r(n_img, s_dim + 2),
               "text_features": r(n_txt, s_dim + 1), "n_paired": n_txt}
    # the teacher has image targets for every image (paired + unpaired), text targets for paired ones only
    teacher = {"image_embeds": r(n_img, t_dim), "text_embeds": r(n_txt, t_dim), "image_features": r(n_img, s_dim + 2),
               "text_features": r(n_txt, s_dim + 1)}
    return student, teacher


@pytest.mark.parametrize("cls, terms", [(FdMse, ["mse"]), (FdCosine, ["cosine"]), (FdMseCosine, ["mse", "cosine"])])
@pytest.mark.parametrize("normalize", [True, False])
def test_fd_matches_reference_with_and_without_normalisation(cls: type, terms: list[str], normalize: bool) -> None:
    student, teacher = fd_inputs()
    level = "embeds" if normalize else "features"  # unnormalised: the raw pooled features (embeddings are unit)
    keys = [f"image_{level}", f"text_{level}"]
    for key in keys:
        student[key].requires_grad_()
    obj = cls(_ctx(), ["image", "text"], normalize=normalize, level=level)
    assert len(obj.proj) == 0  # equal widths: nothing to learn
    out = obj(student, teacher)
    assert set(out) == {f"{t}_{tower}" for t in terms for tower in ("image", "text")}
    for tower in ("image", "text"):
        key = f"{tower}_{level}"
        ref = ref_fd_lists(student[key].tolist(), teacher[key].tolist(), normalize)
        width = student[key].shape[1] if cls is FdMse else 1  # fd_mse: the mean over dimensions (CLIP-KD's)
        ref["mse"] /= width
        for t in terms:
            assert out[f"{t}_{tower}"].item() == pytest.approx(ref[t], rel=1e-10, abs=1e-12)
    # gradients against autograd through a plain per-element reference
    total = sum(out.values())
    got = torch.autograd.grad(total, [student[k] for k in keys])
    ref_total = 0.0
    for key in keys:
        s, t = student[key][: teacher[key].shape[0]], teacher[key]
        width = s.shape[1] if cls is FdMse else 1
        if normalize:
            s = s / s.pow(2).sum(-1, keepdim=True).sqrt()
            t = t / t.pow(2).sum(-1, keepdim=True).sqrt()
        for i in range(t.shape[0]):
            if "mse" in terms:
                ref_total = ref_total + sum((s[i, k] - t[i, k]) ** 2 for k in range(s.shape[1])) / t.shape[0] / width
            if "cosine" in terms:
                dot = sum(s[i, k] * t[i, k] for k in range(s.shape[1]))
                ref_total = ref_total + (1 - dot / (s[i].norm() * t[i].norm())) / t.shape[0]
    want = torch.autograd.grad(ref_total, [student[k] for k in keys])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert torch.all(got[0][teacher[keys[1]].shape[0]:] != 0)  # unpaired images do get image targets


def test_fd_learnable_projection_when_widths_differ() -> None:
    s_dim, t_dim = 4, 7
    student, teacher = fd_inputs(s_dim=s_dim, t_dim=t_dim, seed=7)
    student = {k: (v.float() if torch.is_tensor(v) else v) for k, v in student.items()}
    teacher = {k: v.float() for k, v in teacher.items()}
    total = build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse", weight=2.0,
                                                                        towers=["image"])], _ctx(s_dim, t_dim))
    fd = total.objectives[1]
    assert set(fd.proj) == {"image"}  # only the listed tower gets a map
    proj = fd.proj["image"]
    assert tuple(proj.weight.shape) == (t_dim, s_dim) and proj.bias is None
    # a real parameter of the module tree: the optimizer, DDP and checkpoints see it
    names = dict(total.named_parameters())
    assert names["objectives.1.proj.image.weight"] is proj.weight
    assert "objectives.1.proj.image.weight" in total.state_dict()
    # the term uses the mapped student vectors
    out = fd(student, teacher)
    mapped = (student["image_embeds"] @ proj.weight.detach().t()).tolist()
    ref_mse = ref_fd_lists(mapped, teacher["image_embeds"].tolist(), True)["mse"] / t_dim  # mean over dimensions
    assert out["mse_image"].item() == pytest.approx(ref_mse, rel=1e-5)
    # and it is trained: a backward pass gives it a gradient, an optimizer step moves it
    student["logit_scale"] = torch.tensor(10.0)
    loss = total(student, teacher)["loss"]
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    before = proj.weight.detach().clone()
    torch.optim.SGD(total.parameters(), lr=0.1).step()
    assert not torch.equal(before, proj.weight.detach())
    # a state dict round trip restores it
    other = build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse", weight=2.0,
                                                                        towers=["image"])], _ctx(s_dim, t_dim))
    other.load_state_dict(total.state_dict())
    assert torch.equal(other.objectives[1].proj["image"].weight, proj.weight)


def test_fd_feature_level_uses_feature_widths() -> None:
    obj = FdMse(_ctx(4, 4, {"image": 8, "text": 5}, {"image": 12, "text": 5}), ["image", "text"], level="features")
    assert set(obj.proj) == {"image"} and tuple(obj.proj["image"].weight.shape) == (12, 8)
    with pytest.raises(ValueError, match="level"):
        FdMse(_ctx(), ["image"], level="pixels")


def test_fd_without_teacher_target_names_the_key() -> None:
    student, teacher = fd_inputs()
    del teacher["text_embeds"]
    with pytest.raises(KeyError, match="text_embeds"):
        FdMse(_ctx(), ["image", "text"])(student, teacher)


# ----------------------------------------------------------------------------------------------------------
# the weighted sum


def test_weighted_sum_total_is_sum_of_weighted_terms() -> None:
    student, teacher = fd_inputs(seed=11)
    student["image_embeds"] = F.normalize(student["image_embeds"], dim=-1).requires_grad_()
    student["text_embeds"] = F.normalize(student["text_embeds"], dim=-1)
    student["logit_scale"] = torch.tensor(12.0, dtype=torch.float64)
    c = _ctx()
    weights = {"clip": 0.5, "fd_mse_cosine": 3.0, "fd_cosine": -0.25}
    total = WeightedSum([("clip", 0.5, ClipObjective(c, ["image", "text"])),
                         ("fd_mse_cosine", 3.0, FdMseCosine(c, ["image", "text"])),
                         ("fd_cosine", -0.25, FdCosine(c, ["text"]))])
    assert total.needs_teacher
    out = total(student, teacher)
    assert set(out) == {"loss", "clip", "fd_mse_cosine/mse_image", "fd_mse_cosine/cosine_image",
                        "fd_mse_cosine/mse_text", "fd_mse_cosine/cosine_text", "fd_cosine/cosine_text"}
    expected = sum(weights[k.split("/")[0]] * v.item() for k, v in out.items() if k != "loss")
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    # terms are logged detached; the total carries the gradient
    assert out["loss"].requires_grad and not any(v.requires_grad for k, v in out.items() if k != "loss")
    # independently recomputed
    img, txt = student["image_embeds"].tolist(), student["text_embeds"].tolist()
    fi = ref_fd_lists(img, teacher["image_embeds"].tolist(), True)
    ft = ref_fd_lists(txt, teacher["text_embeds"].tolist(), True)
    ref = (0.5 * ref_clip_loops(img[:4], txt, 12.0) + 3.0 * (fi["mse"] + fi["cosine"] + ft["mse"] + ft["cosine"])
           - 0.25 * ft["cosine"])
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)


def test_weighted_sum_without_teacher_objectives() -> None:
    total = build_objectives([ObjectiveSpec(name="clip", weight=2.0)], _ctx())
    assert not total.needs_teacher
    image, text = unit_rows(3, LDIM, seed=8), unit_rows(3, LDIM, seed=9)
    out = total({"image_embeds": image, "text_embeds": text, "logit_scale": torch.tensor(5.0, dtype=torch.float64),
                 "n_paired": 3}, {})
    assert out["loss"].item() == pytest.approx(2.0 * ref_clip_loops(image.tolist(), text.tolist(), 5.0), rel=1e-10)
