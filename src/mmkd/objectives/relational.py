"""Relational distillation: the student copies how the teacher relates the samples of a batch to each other.

All of these compare samples across the batch, so they run on the global batch (features gathered from every
rank with gradients): two processes compute exactly what one process computes on the same global batch.

- ``crd``  CLIP-KD's contrastive relational distillation: KL between the teacher's and the student's in-batch
           image→text and text→image distributions, each model with its own logit scale.
- ``afd``  TinyCLIP's affinity mimicking: the same two affinity distributions, but computed with one shared
           temperature for both models (the teacher's logit scale unless ``temperature`` is given).
- ``icl``  CLIP-KD's interactive contrastive learning: InfoNCE of student images against teacher captions and
           of student captions against teacher images, averaged.
- ``gd``   CLIP-KD's gradient distillation: the gradients of each one-way contrastive loss (image→text and
           text→image) with respect to its anchors and its keys, in closed form, matched between teacher and
           student (four terms).
- ``rkd``  Park et al.'s relational KD: pairwise distances and triplet angles within each modality.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.errors import ConfigError
from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext
from mmkd.objectives.logit import DIRECTIONS, similarity_logits
from mmkd.objectives.shared import (
    MAX_LOGIT_SCALE,
    WidthMap,
    gathered,
    kl_rows,
    need,
    paired,
    student_scale,
    teacher_scale,
)


@OBJECTIVES.register("crd")
class CrdObjective(Objective):
    """``KL(p_t ‖ p_s)`` of the softmax over the global batch's scaled similarities, per direction (towers:
    ``image`` = image→text rows, ``text`` = text→image rows). CLIP-KD averages the two directions; here they
    are two logged terms that add up (weight 0.5 reproduces CLIP-KD's average).
    """

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, scale: float | None = None) -> None:
        super().__init__(ctx, towers)
        self.scale = scale

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        zs, zt = similarity_logits(student, teacher, "crd", self.scale)
        return {DIRECTIONS[t]: kl_rows(zs, zt) if t == "image" else kl_rows(zs.t(), zt.t()) for t in self.towers}


@OBJECTIVES.register("afd")
class AffinityObjective(Objective):
    """TinyCLIP's affinity mimicking: ``A = softmax(I·Tᵀ / τ)`` (image→text) and its text→image counterpart,
    with one temperature τ for teacher and student; the student's affinities match the teacher's.

    TinyCLIP's soft cross-entropy differs from the KL used here by the teacher's entropy, a constant: the
    gradients are identical, and the loss is 0 when the student reproduces the teacher.
    temperature: τ; default (None) the teacher's own 1/logit scale.
    """

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, temperature: float | None = None) -> None:
        super().__init__(ctx, towers)
        if temperature is not None and temperature <= 0:
            raise ConfigError(f"afd: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        scale = (1.0 / self.temperature if self.temperature is not None
                 else float(teacher_scale(teacher, student)))
        zs, zt = similarity_logits(student, teacher, "afd", scale)
        return {DIRECTIONS[t]: kl_rows(zs, zt) if t == "image" else kl_rows(zs.t(), zt.t()) for t in self.towers}


@OBJECTIVES.register("icl")
class IclObjective(Objective):
    """CLIP-KD's interactive contrastive learning: ``½ CE(s·I_s·T_tᵀ) + ½ CE(s·T_s·I_tᵀ)``, student image i
    picking teacher caption i among the global batch's (term ``i2t``, tower ``image``) and student caption i
    teacher image i (term ``t2i``, tower ``text``); each term carries its ½, so the two add up to CLIP-KD's
    ``icl_loss`` and its weights transfer. The student's embeddings are mapped to the teacher's width where they
    differ (a learnable map). The scale s is the objective's own, learnt from 1/0.07 (CLIP-KD's
    ``cross_logit_scale``; its code multiplies by that parameter un-exponentiated, we use exp as for every CLIP
    scale), unless ``temperature`` fixes it. It is held at CLIP's cap of 100 as CLIP holds its own: the
    parameter is clamped (before each use, i.e. after every step), never the value in the forward, so the
    gradient reaches it at the cap too.
    """

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, temperature: float | None = None) -> None:
        super().__init__(ctx, towers)
        self.temperature = temperature
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=temperature is None)
        self.width = WidthMap(["image", "text"], ctx.student_embed_dim, ctx.teacher_embed_dim)

    def scale(self, like: torch.Tensor) -> torch.Tensor:
        if self.temperature is not None:
            return torch.tensor(1.0 / self.temperature, dtype=like.dtype, device=like.device)
        cap = math.log(MAX_LOGIT_SCALE)
        if float(self.log_scale.detach()) > cap:  # CLIP's clamp of the parameter, not of the forward's value
            with torch.no_grad():
                self.log_scale.clamp_(max=cap)
        return self.log_scale.exp()

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        t_image, t_text = paired(teacher, need(teacher, "text_embeds", "icl").shape[0])
        s_image, s_text = paired(student)
        s_image, s_text = self.width("image", s_image), self.width("text", s_text)
        s_image, s_text, t_image, t_text = gathered(s_image, s_text, t_image.to(s_image.dtype),
                                                    t_text.to(s_image.dtype))
        scale = self.scale(s_image)
        target = torch.arange(s_image.shape[0], device=s_image.device)
        out = {}
        if "image" in self.towers:
            out["i2t"] = 0.5 * F.cross_entropy(scale * s_image @ t_text.t(), target)
        if "text" in self.towers:
            out["t2i"] = 0.5 * F.cross_entropy(scale * s_text @ t_image.t(), target)
        return out


def one_way_gradients(anchor: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the one-way InfoNCE ``CE(s·A·Kᵀ)`` (mean over the n anchors) w.r.t. the anchors and the keys.

    With P the row softmax of s·A·Kᵀ and E the identity: dL/dA = s·(P − E)·K / n, dL/dK = s·(P − E)ᵀ·A / n
    (CLIP-KD's ``get_grad``, with s = 1/τ).
    """
    logits = scale * anchor @ keys.t()
    n = logits.shape[0]
    eye = torch.eye(n, device=logits.device, dtype=logits.dtype)
    d_logits = (logits.softmax(dim=1) - eye) * (scale / n)
    return d_logits @ keys, d_logits.t() @ anchor


@OBJECTIVES.register("gd")
class GdObjective(Objective):
    """CLIP-KD's gradient distillation: for the image→text loss (image anchors, caption keys; tower ``image``)
    and the text→image loss (tower ``text``), the closed-form gradients w.r.t. the anchors and the keys,
    student vs teacher, each by ``F.mse_loss`` (the mean over samples and dimensions): terms ``i2t_anchor``,
    ``i2t_keys``, ``t2i_anchor``, ``t2i_keys``, which add up to CLIP-KD's ``gd_loss``. Each model's own logit
    scale (``scale`` fixes one for both) is 1/τ, so these are the gradients of the contrastive loss each model
    trains with (CLIP-KD's code passes the exp'd scale where its ``get_grad`` divides by τ, i.e. divides by
    ~100). Global batch; student embeddings mapped to the teacher's width where they differ.
    """

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, scale: float | None = None) -> None:
        super().__init__(ctx, towers)
        self.scale = scale
        self.width = WidthMap(["image", "text"], ctx.student_embed_dim, ctx.teacher_embed_dim)

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        t_image, t_text = paired(teacher, need(teacher, "text_embeds", "gd").shape[0])
        s_image, s_text = paired(student)
        s_image, s_text = self.width("image", s_image), self.width("text", s_text)
        s_image, s_text, t_image, t_text = gathered(s_image, s_text, t_image.to(s_image.dtype),
                                                    t_text.to(s_image.dtype))
        s_scale, t_scale = student_scale(student, self.scale), teacher_scale(teacher, student, self.scale)
        out = {}
        for tower, direction in DIRECTIONS.items():
            if tower not in self.towers:
                continue
            (sa, sk), (ta, tk) = ((s_image, s_text), (t_image, t_text)) if tower == "image" else \
                ((s_text, s_image), (t_text, t_image))
            gs = one_way_gradients(sa, sk, s_scale)
            with torch.no_grad():
                gt = one_way_gradients(ta, tk, t_scale)
            out[f"{direction}_anchor"] = F.mse_loss(gs[0], gt[0])
            out[f"{direction}_keys"] = F.mse_loss(gs[1], gt[1])
        return out


def _gram_geometry(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise distances D [n, n] and the cosine of every angle (i, j, k) at vertex j, [n(j), n(i), n(k)].

    Both come from the Gram matrix G = X·Xᵀ: (x_i − x_j)·(x_k − x_j) = G_ik − G_ij − G_jk + G_jj, so the angles
    cost n³ scalar operations instead of the n³·d of building every difference vector.
    """
    g = x @ x.t()
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(eps)
    d = d2.sqrt()
    # dot[j, i, k] = G_ik - G_ij - G_jk + G_jj
    dot = g[None, :, :] - g.t()[:, :, None] - g[:, None, :] + sq[:, None, None]
    return d, dot / (d[:, :, None] * d[:, None, :])


@OBJECTIVES.register("rkd")
class RkdObjective(Objective):
    """Relational KD (Park et al., 2019) within each tower: Huber loss between the student's and teacher's
    distance matrices (each divided by its mean distance) and between the cosines of all triplet angles.
    Terms ``distance_<tower>`` (times distance_weight) and ``angle_<tower>`` (times angle_weight). The image
    tower uses every image of the batch, unpaired ones included. Cost grows as n³ in the global batch.
    """

    caption_terms = "text"  # within each tower: only the text tower's relations read captions

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, distance_weight: float = 1.0,
                 angle_weight: float = 2.0) -> None:
        super().__init__(ctx, towers)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for tower in self.towers:
            key = f"{tower}_embeds"
            t = need(teacher, key, "rkd")
            s = student[key][: t.shape[0]]
            s, t = gathered(s, t.to(s.dtype))
            n = s.shape[0]
            if n < 3:
                raise ValueError("rkd needs at least 3 samples in the (global) batch")
            off = ~torch.eye(n, dtype=torch.bool, device=s.device)
            ds, angs = _gram_geometry(s)
            with torch.no_grad():
                dt, angt = _gram_geometry(t)
            ds, dt = ds[off], dt[off]
            dist = F.smooth_l1_loss(ds / ds.mean(), dt / dt.mean())
            distinct = off[:, :, None] & off[:, None, :] & off[None, :, :]  # j≠i, j≠k, i≠k
            angle = F.smooth_l1_loss(angs[distinct], angt[distinct])
            if self.distance_weight:
                out[f"distance_{tower}"] = self.distance_weight * dist
            if self.angle_weight:
                out[f"angle_{tower}"] = self.angle_weight * angle
        return out
