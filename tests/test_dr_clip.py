"""dr_clip (MobileCLIP's DRClipLoss) against a float64 reference written from the equations with plain loops."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mmkd.config import ConfigError, ObjectiveSpec
from mmkd.objectives import OBJECTIVES
from mmkd.objectives.base import ObjectiveContext, build_objectives, objective_params

N, D = 5, 6


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)


def log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def softmax(row: list[float]) -> list[float]:
    return [math.exp(x) for x in log_softmax(row)]


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def reference(si: torch.Tensor, st: torch.Tensor, s: float, teachers: list[tuple[torch.Tensor, torch.Tensor, float]],
              wc: float, wd: float, average_after_softmax: bool, broken: bool = False) -> tuple[float, float]:
    """(weighted contrastive, weighted distillation) from the equations; ``broken`` takes the text→image teacher
    distribution from the untransposed matrix (a plausible bug the test must catch)."""
    n = si.shape[0]
    z = [[s * dot(si[i], st[j]) for j in range(n)] for i in range(n)]
    zt = [[z[j][i] for j in range(n)] for i in range(n)]
    contrastive = 0.5 * (-sum(log_softmax(z[i])[i] for i in range(n)) / n
                         - sum(log_softmax(zt[i])[i] for i in range(n)) / n)
    mats = [[[tau * dot(ti[i], tt[j]) for j in range(n)] for i in range(n)] for ti, tt, tau in teachers]
    mats_t = [[[a[j][i] for j in range(n)] for i in range(n)] for a in mats]
    if broken:
        mats_t = mats

    def dist(ms: list[list[list[float]]]) -> list[list[float]]:
        if average_after_softmax:
            return [[sum(softmax(m[i])[j] for m in ms) / len(ms) for j in range(n)] for i in range(n)]
        return [softmax([sum(m[i][j] for m in ms) for j in range(n)]) for i in range(n)]

    p, q = dist(mats), dist(mats_t)
    ce_p = -sum(sum(p[i][j] * log_softmax(z[i])[j] for j in range(n)) for i in range(n)) / n
    ce_q = -sum(sum(q[i][j] * log_softmax(zt[i])[j] for j in range(n)) for i in range(n)) / n
    return wc * contrastive, wd * 0.5 * (ce_p + ce_q)


def student_and_teachers(m: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    student = {"image_embeds": unit(N + 2, D, 1), "text_embeds": unit(N, D, 2),  # 2 unpaired images last
               "logit_scale": torch.tensor(14.0, dtype=torch.float64), "n_paired": N}
    teachers = [{"image_embeds": unit(N + 2, D + k, 10 + k), "text_embeds": unit(N, D + k, 20 + k),
                 "logit_scale": torch.tensor(30.0 + 20 * k, dtype=torch.float64)} for k in range(m)]
    return student, teachers


def dr_clip(**params: Any) -> Any:
    return OBJECTIVES.get("dr_clip")(ObjectiveContext(D, D), ["image", "text"], **params)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("average_after_softmax", [False, True])
@pytest.mark.parametrize("scale", [None, 50.0])
def test_dr_clip_matches_the_float64_reference(m: int, average_after_softmax: bool, scale: float | None) -> None:
    student, teachers = student_and_teachers(m)
    obj = dr_clip(contrastive_weight=0.3, distill_weight=2.0, average_after_softmax=average_after_softmax,
                  teacher_logit_scale=scale)
    out = obj(student, teachers)
    ref_teachers = [(t["image_embeds"][:N], t["text_embeds"], scale or float(t["logit_scale"])) for t in teachers]
    si = student["image_embeds"][:N]
    c, d = reference(si, student["text_embeds"], 14.0, ref_teachers, 0.3, 2.0, average_after_softmax)
    assert float(out["contrastive"]) == pytest.approx(c, rel=1e-9, abs=1e-12)
    assert float(out["distill"]) == pytest.approx(d, rel=1e-9, abs=1e-12)
    _, broken = reference(si, student["text_embeds"], 14.0, ref_teachers, 0.3, 2.0, average_after_softmax,
                          broken=True)
    assert abs(broken - d) > 1e-3  # the reference tells a transposition bug apart: the check above can fail


def test_two_teachers_average_after_softmax_differs_from_summed_logits() -> None:
    student, teachers = student_and_teachers(2)
    a = dr_clip(average_after_softmax=True)(student, teachers)["distill"]
    b = dr_clip(average_after_softmax=False)(student, teachers)["distill"]
    assert abs(float(a) - float(b)) > 1e-3


def test_one_teacher_equals_kl_plus_teacher_entropy() -> None:
    """With one teacher the distillation part is the kl objective (T=1) plus the teacher's row entropies."""
    student, teachers = student_and_teachers(1)
    t = teachers[0]
    d = float(dr_clip(contrastive_weight=0.0)(student, teachers)["distill"])
    kl = OBJECTIVES.get("kl")(ObjectiveContext(D, D), ["image", "text"], temperature=1.0)(student, t)
    a = float(t["logit_scale"]) * t["image_embeds"][:N] @ t["text_embeds"].t()
    entropy = [-(F.softmax(x, -1) * F.log_softmax(x, -1)).sum(-1).mean() for x in (a, a.t())]
    assert d == pytest.approx(0.5 * (float(kl["i2t"] + kl["t2i"]) + float(sum(entropy))), rel=1e-9)


def test_dr_clip_through_build_objectives_one_teacher_is_a_list_of_one() -> None:
    student, teachers = student_and_teachers(1)
    terms = build_objectives([ObjectiveSpec("dr_clip")], ObjectiveContext(D, D))(student, teachers[0])
    direct = dr_clip()(student, teachers)
    assert float(terms["loss"]) == pytest.approx(float(direct["contrastive"] + direct["distill"]), rel=1e-12)
    assert set(terms) == {"loss", "dr_clip/contrastive", "dr_clip/distill"}


@pytest.mark.parametrize("params, message", [
    ({"contrastive_weight": -1.0}, "contrastive_weight must be a number ≥ 0"),
    ({"distill_weight": "x"}, "distill_weight must be a number ≥ 0"),
    ({"contrastive_weight": 0.0, "distill_weight": 0.0}, "both 0"),
    ({"average_after_softmax": "yes"}, "average_after_softmax must be true or false"),
    ({"teacher_logit_scale": 0.0}, "teacher_logit_scale must be a number > 0"),
])
def test_dr_clip_refuses_bad_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        build_objectives([ObjectiveSpec("dr_clip", params=params)], ObjectiveContext(D, D))
    assert "objectives[0] (dr_clip)" in str(e.value)


def test_dr_clip_is_listed_with_its_parameters() -> None:
    assert objective_params(OBJECTIVES.get("dr_clip")) == {
        "contrastive_weight": 1.0, "distill_weight": 1.0, "average_after_softmax": False, "teacher_logit_scale": None}


def test_without_distillation_it_needs_no_teacher() -> None:
    student, _ = student_and_teachers(1)
    obj = dr_clip(distill_weight=0.0)
    assert not obj.uses_teacher
    assert set(obj(student, [{}])) == {"contrastive"}
