"""Task objectives that align a student's own image and text embeddings."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext
from mmkd.train.distributed import gather_with_grad


def paired(student: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of the paired samples of this rank's batch."""
    n = int(student["n_paired"])
    return student["image_embeds"][:n], student["text_embeds"]


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
                 max_logit_scale: float = 100.0) -> None:
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
