"""Task objectives that align a student's own image and text embeddings."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mmkd.dist import gather_with_grad
from mmkd.errors import ConfigError
from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext
from mmkd.objectives.shared import MAX_LOGIT_SCALE, gathered, need, paired


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over normalised embeddings of one (global) batch."""
    logits = scale * image @ text.t()
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@OBJECTIVES.register("clip")
class ClipObjective(Objective):
    """Symmetric InfoNCE on features gathered from every rank (the global batch), as open_clip does.

    temperature: a fixed temperature instead of the student's learnable logit scale.
    """

    uses_teacher = False

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, temperature: float | None = None,
                 max_logit_scale: float = MAX_LOGIT_SCALE) -> None:
        super().__init__(ctx, towers)
        self.temperature = temperature
        self.max_logit_scale = max_logit_scale

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, text = paired(student)
        if self.temperature is not None:
            scale = torch.tensor(1.0 / self.temperature, device=image.device)
        else:
            scale = student["logit_scale"].clamp(max=self.max_logit_scale)
        loss = clip_loss(gather_with_grad(image), gather_with_grad(text), scale)
        return {"clip": loss}


# ----------------------------------------------------------------------------------------------------------
# triplet (the half-depth-CLIP recipe's task loss) and SigLIP's pairwise sigmoid

TRIPLET_NEGATIVES = ("all", "hardest", "semihard")


def triplet_from_similarities(sim: torch.Tensor, margin: float, negatives: str) -> torch.Tensor:
    """Hinge ``max(0, margin - s(a, p) + s(a, n))`` with anchors on rows, the positive on the diagonal.

    all: the mean over every (anchor, negative) pair; hardest: each anchor's most similar negative (VSE++);
    semihard: each anchor's most similar negative among those less similar than its positive (FaceNet), or its
    least similar negative where there is none.
    """
    n = sim.shape[0]
    if n < 2:
        raise ValueError("the triplet loss needs at least 2 pairs in the (global) batch")
    pos = sim.diagonal()
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    if negatives == "all":
        hinge = (margin - pos[:, None] + sim).clamp_min(0).masked_fill(eye, 0.0)
        return hinge.sum() / (n * (n - 1))
    if negatives == "hardest":
        neg = sim.masked_fill(eye, float("-inf")).amax(dim=1)
    else:
        below = sim.masked_fill(eye | (sim >= pos[:, None]), float("-inf")).amax(dim=1)
        easiest = sim.masked_fill(eye, float("inf")).amin(dim=1)
        neg = torch.where(torch.isfinite(below), below, easiest)
    return (margin - pos + neg).clamp_min(0).mean()


@OBJECTIVES.register("triplet")
class TripletObjective(Objective):
    """Symmetric triplet loss on cosine similarities of the student's image and caption embeddings (the
    half-depth-CLIP recipe's task loss): image anchors against captions and caption anchors against images,
    averaged; global batch.

    negatives: ``all`` (batch-all), ``hardest`` or ``semihard``.
    """

    uses_teacher = False

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, margin: float = 0.2,
                 negatives: str = "hardest") -> None:
        super().__init__(ctx, towers)
        if negatives not in TRIPLET_NEGATIVES:
            raise ConfigError(f"triplet: negatives must be one of {', '.join(TRIPLET_NEGATIVES)}, got {negatives!r}")
        self.margin, self.negatives = float(margin), negatives

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, text = paired(student)
        image, text = gather_with_grad(image), gather_with_grad(text)
        sim = image @ text.t()
        loss = 0.5 * (triplet_from_similarities(sim, self.margin, self.negatives)
                      + triplet_from_similarities(sim.t(), self.margin, self.negatives))
        return {"triplet": loss}


SIGLIP_TARGETS = ("labels", "teacher")


def siglip_logits_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """``-sum [p log sigmoid(z) + (1 - p) log sigmoid(-z)] / n`` over an [n, n] logit matrix; p is the identity
    (SigLIP's labels: +1 on the diagonal, -1 elsewhere) where ``targets`` is None, else those probabilities."""
    if targets is None:
        signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


@OBJECTIVES.register("siglip")
class SiglipObjective(Objective):
    """SigLIP's pairwise sigmoid loss: every (image, caption) pair of the global batch is a binary decision,
    ``-sum log sigmoid(z_ij (t x_i.y_j + b)) / n`` with z = +1 on the diagonal and -1 elsewhere.

    The temperature t and bias b: a SigLIP student's own (its ``logit_scale``/``logit_bias``, inherited from a
    SigLIP teacher, trained and saved with it); for any other student the objective learns its own (unless
    ``learnable: false``), initialised at a SigLIP teacher's values where the teacher is one, else at SigLIP's
    10 and -10 (or ``init_scale``/``init_bias``). The objective's own t is not capped, as SigLIP's is not (its
    paper and reference code use exp(t') as learnt; a SigLIP teacher's is ~117): capping it at CLIP's 100 in the
    forward would leave a scale started from such a teacher with no gradient, at another value than the
    teacher's targets use.

    targets: ``labels`` (the task loss above) or ``teacher``: the binary targets are the SigLIP teacher's own
    sigmoid probabilities of each pair, ``sigmoid(t_T x^T_i.y^T_j + b_T)`` with its learnt bias b_T (distillation;
    needs a SigLIP teacher).
    """

    uses_teacher = False

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, init_scale: float | None = None,
                 init_bias: float | None = None, learnable: bool = True, targets: str = "labels") -> None:
        super().__init__(ctx, towers)
        if targets not in SIGLIP_TARGETS:
            raise ConfigError(f"siglip: targets must be one of {', '.join(SIGLIP_TARGETS)}, got {targets!r}")
        if targets == "teacher" and ctx.teacher_logit_bias is None:
            raise ConfigError("siglip: targets: teacher distils a SigLIP teacher's sigmoid probabilities and needs "
                              "a SigLIP teacher (a SiglipModel folder, or a teacher cache built from one); this "
                              "teacher has no learnt logit bias. Use targets: labels, or a relational objective")
        self.targets = targets
        self.uses_teacher = targets == "teacher"
        self.own = not ctx.student_logit_bias
        if not self.own:
            if init_scale is not None or init_bias is not None or not learnable:
                raise ConfigError("siglip: a SigLIP student trains its own logit_scale and logit_bias (from the "
                                  "teacher); drop init_scale/init_bias/learnable (freeze them with student.freeze: "
                                  "[logit_scale, logit_bias])")
            return
        scale = init_scale if init_scale is not None else (ctx.teacher_logit_scale or 10.0)
        bias = init_bias if init_bias is not None else (
            ctx.teacher_logit_bias if ctx.teacher_logit_bias is not None else -10.0)
        if scale <= 0:
            raise ConfigError(f"siglip: init_scale must be > 0, got {scale}")
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learnable)
        self.bias = torch.nn.Parameter(torch.tensor(float(bias)), requires_grad=learnable)

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, text = paired(student)
        image, text = gather_with_grad(image), gather_with_grad(text)
        if self.own:
            scale, bias = self.log_scale.exp(), self.bias
        else:
            scale, bias = student["logit_scale"], student["logit_bias"]
        logits = scale * image @ text.t() + bias
        probs = None
        if self.targets == "teacher":
            t_image, t_text = gathered(*paired(teacher, need(teacher, "text_embeds", "siglip").shape[0]))
            with torch.no_grad():
                t_logits = need(teacher, "sigmoid_logit_scale", "siglip") * (t_image @ t_text.t()) \
                    + need(teacher, "logit_bias", "siglip")
                probs = torch.sigmoid(t_logits.to(logits.dtype))
        return {"siglip": siglip_logits_loss(logits, probs)}
