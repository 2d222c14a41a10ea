"""MobileCLIP's dataset-reinforcement loss (``DRClipLoss`` in apple/ml-mobileclip's open_clip patch), from its
equations: a contrastive part on the student's own similarities plus a distillation part that matches the
student's image→text and text→image distributions to a teacher ensemble's.

With Z = s · I Tᵀ the student's logits over the (global) batch (s its own learnt scale, capped at 100) and, per
teacher m, A_m = τ_m · I_m T_mᵀ (τ_m the teacher's scale, or ``teacher_logit_scale`` for all):

    contrastive = ½ [CE(Z, diag) + CE(Zᵀ, diag)]
    P = mean_m softmax(A_m)            (average_after_softmax)   or   softmax(Σ_m A_m)   (concatenated embeddings)
    Q = the same over A_mᵀ
    distill     = ½ [−mean_i Σ_j P_ij log softmax(Z)_ij − mean_i Σ_j Q_ij log softmax(Zᵀ)_ij]

Σ_m A_m is what MobileCLIP computes from the teachers' concatenated (separately normalised) embeddings with one
scale. The distillation part is a cross-entropy, as MobileCLIP's: KL plus the teacher's entropy (same gradient).
The terms are returned already weighted by ``contrastive_weight`` and ``distill_weight`` (MobileCLIP's
``distill_loss_weights``; its DataCompDR runs use 0 and 1 with average_after_softmax and a teacher scale of 100).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmkd.errors import ConfigError
from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext
from mmkd.objectives.contrastive import clip_loss
from mmkd.objectives.shared import gathered, need, paired, student_scale, teacher_scale


def soft_cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``−mean_i Σ_j target_ij log softmax(logits)_ij``: the student's rows against a teacher's distributions."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def teacher_distributions(logits: list[torch.Tensor], average_after_softmax: bool) -> torch.Tensor:
    """Row distributions of an ensemble's logit matrices: the mean of their softmaxes, or the softmax of their sum."""
    if average_after_softmax:
        return torch.stack([F.softmax(a, dim=-1) for a in logits]).mean(dim=0)
    return F.softmax(torch.stack(logits).sum(dim=0), dim=-1)


@OBJECTIVES.register("dr_clip")
class DrClip(Objective):
    """MobileCLIP's DRClipLoss over every teacher of an ensemble at once (see the module docstring).

    contrastive_weight, distill_weight: the two parts' weights (≥ 0, not both 0); average_after_softmax: average
    the teachers' softmaxes (MobileCLIP's ``--distill-average-after-softmax``) rather than softmax their summed
    logits; teacher_logit_scale: one scale for every teacher's similarities (MobileCLIP's ``--distill-logit-scale``),
    default each teacher's own (capped at 100).
    """

    handles_ensembles = True

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, contrastive_weight: float = 1.0,
                 distill_weight: float = 1.0, average_after_softmax: bool = False,
                 teacher_logit_scale: float | None = None) -> None:
        super().__init__(ctx, towers)
        for key, value in (("contrastive_weight", contrastive_weight), ("distill_weight", distill_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"dr_clip: {key} must be a number ≥ 0, got {value!r}")
        if contrastive_weight == 0 and distill_weight == 0:
            raise ConfigError("dr_clip: contrastive_weight and distill_weight are both 0, so it trains nothing; "
                              "give one of them a weight > 0")
        if not isinstance(average_after_softmax, bool):
            raise ConfigError(f"dr_clip: average_after_softmax must be true or false, got {average_after_softmax!r}")
        if teacher_logit_scale is not None and (isinstance(teacher_logit_scale, bool) or not isinstance(
                teacher_logit_scale, (int, float)) or not teacher_logit_scale > 0):
            raise ConfigError(f"dr_clip: teacher_logit_scale must be a number > 0 (or null: each teacher's own), "
                              f"got {teacher_logit_scale!r}")
        self.contrastive_weight, self.distill_weight = float(contrastive_weight), float(distill_weight)
        self.average_after_softmax = average_after_softmax
        self.teacher_logit_scale = None if teacher_logit_scale is None else float(teacher_logit_scale)
        self.uses_teacher = self.distill_weight > 0

    def forward(self, student: dict[str, Any], teacher: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        s_image, s_text = gathered(*paired(student))
        zs = student_scale(student) * s_image @ s_text.t()
        out = {"contrastive": self.contrastive_weight * clip_loss(s_image, s_text, student_scale(student))}
        if not self.uses_teacher:
            return out
        per_image, per_text = [], []
        with torch.no_grad():
            for t in teacher:
                t_image, t_text = paired(t, need(t, "text_embeds", "dr_clip").shape[0])
                t_image, t_text = gathered(t_image.to(zs.dtype), t_text.to(zs.dtype))
                if self.teacher_logit_scale is not None:
                    scale = torch.as_tensor(self.teacher_logit_scale, dtype=zs.dtype, device=zs.device)
                else:
                    scale = teacher_scale(t, student).to(zs.dtype)
                a = scale * t_image @ t_text.t()
                per_image.append(a)
                per_text.append(a.t())
            p = teacher_distributions(per_image, self.average_after_softmax)
            q = teacher_distributions(per_text, self.average_after_softmax)
        distill = 0.5 * (soft_cross_entropy(p, zs) + soft_cross_entropy(q, zs.t()))
        out["distill"] = self.distill_weight * distill
        return out
