"""Distillation losses for a binary matcher, registered by name (the study's two variants).

Both take the student's and the (cached, frozen) teacher's matching logits and the labels, and mix a KD term
with the task loss (BCE with the labels): ``loss = α · KD + (1 − α) · BCE``. Pairs of the teacher's transfer
set (unlabelled recombinations of training images and captions) join the KD term only.

* ``kl``: Hinton's KL on the two-class softmax of ``[0, z] / T`` (whose class-1 probability is
  ``sigmoid(z / T)``), teacher distribution first, scaled by ``T²`` so its gradients keep their size as T
  grows.
* ``bce``: sigmoid with temperature on both logits and BCE between the probabilities, as the original study describes it
  (no ``T²``).

For a single logit the two are the same divergence: ``KL = BCE − H(p_teacher)``, so the ``kl`` term's
gradient is exactly ``T²`` times the ``bce`` term's. What differs between the variants at the same (T, α) is
therefore the weight of distillation against the task loss, which the sweep explores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmkd.errors import UsageError
from mmkd.registry import Registry

KDTerm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
MATCHING_KD: Registry[KDTerm] = Registry("matching KD loss")


def check_kd_params(temperature: float, alpha: float) -> None:
    """α ∈ [0, 1] and T > 0 (finite), or a ValueError that names the parameter."""
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0 or math.isnan(float(alpha)):
        raise UsageError(f"alpha (the weight of the KD term) must be in [0, 1], got {alpha!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(float(temperature)) or temperature <= 0:
        raise UsageError(f"temperature T must be a finite number > 0, got {temperature!r}")


@MATCHING_KD.register("kl")
def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax([0, z_t]/T) ‖ softmax([0, z_s]/T)), averaged over the batch."""
    zeros = torch.zeros_like(student)
    log_p_s = F.log_softmax(torch.stack([zeros, student], dim=-1) / temperature, dim=-1)
    log_p_t = F.log_softmax(torch.stack([zeros, teacher.detach()], dim=-1) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


@MATCHING_KD.register("bce")
def kd_bce(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """BCE(sigmoid(z_s/T), sigmoid(z_t/T)) with the teacher probability as the target (computed stably)."""
    target = torch.sigmoid(teacher.detach() / temperature)
    return F.binary_cross_entropy_with_logits(student / temperature, target)


@dataclass(frozen=True)
class KDConfig:
    """One KD setting: variant (a registered name), temperature T and mixing weight α of the KD term."""

    variant: str = "bce"
    temperature: float = 3.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        MATCHING_KD.get(self.variant)  # unknown names fail here, listing the valid ones
        check_kd_params(self.temperature, self.alpha)

    @property
    def name(self) -> str:
        return f"kd_{self.variant}"


def matching_loss(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None,
                  kd: KDConfig | None = None, transfer_student: torch.Tensor | None = None,
                  transfer_teacher: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{loss, task, kd}: the task BCE alone without ``kd``; α·KD + (1−α)·task with it.

    ``transfer_*``: logits of extra, unlabelled pairs (the teacher's transfer set); they join the KD term only.
    """
    task = F.binary_cross_entropy_with_logits(student, labels.float())
    if kd is None:
        return {"loss": task, "task": task.detach()}
    if teacher is None:
        raise ValueError("a KD loss needs the teacher's logits for the batch")
    if transfer_student is not None and transfer_teacher is not None:
        student, teacher = torch.cat([student, transfer_student]), torch.cat([teacher, transfer_teacher])
    term = MATCHING_KD.get(kd.variant)(student, teacher, kd.temperature)
    return {"loss": kd.alpha * term + (1.0 - kd.alpha) * task, "task": task.detach(), "kd": term.detach()}
