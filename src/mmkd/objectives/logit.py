"""Logit distillation: Hinton's softened distributions over the image–text similarity matrix.

For a CLIP-style pair of models the "logits" of an image are its scaled similarities to every caption of the
(global) batch, and those of a caption its similarities to every image. The student matches the teacher's
softened distributions in both directions.
"""

from __future__ import annotations

from typing import Any

import torch

from mmkd.errors import ConfigError
from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext
from mmkd.objectives.shared import gathered, kl_rows, need, paired, student_scale, teacher_scale

DIRECTIONS = {"image": "i2t", "text": "t2i"}


def similarity_logits(student: dict[str, Any], teacher: dict[str, Any], name: str, fixed_scale: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher image→text logits [N, N] over the global batch, each with its own logit scale."""
    t_image, t_text = paired(teacher, need(teacher, "text_embeds", name).shape[0])
    s_image, s_text = paired(student)
    s_image, s_text, t_image, t_text = gathered(s_image, s_text, t_image.to(s_image.dtype), t_text.to(s_image.dtype))
    zs = student_scale(student, fixed_scale) * s_image @ s_text.t()
    zt = teacher_scale(teacher, student, fixed_scale) * t_image @ t_text.t()
    return zs, zt


@OBJECTIVES.register("kl")
class KlObjective(Objective):
    """Hinton's KD on the image→text (tower ``image``) and text→image (tower ``text``) distributions:
    ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, one term per direction.

    The T² factor keeps gradient magnitudes independent of T (the softened gradients shrink as 1/T²).
    z are each model's similarities times its own logit scale (``scale`` fixes one for both).
    """

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, temperature: float = 2.0,
                 scale: float | None = None) -> None:
        super().__init__(ctx, towers)
        if temperature <= 0:
            raise ConfigError(f"kl: temperature must be > 0, got {temperature}")
        self.temperature, self.scale = float(temperature), scale

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        zs, zt = similarity_logits(student, teacher, "kl", self.scale)
        t = self.temperature
        out = {}
        for tower in self.towers:
            s, u = (zs, zt) if tower == "image" else (zs.t(), zt.t())
            out[DIRECTIONS[tower]] = t * t * kl_rows(s / t, u / t)
        return out
