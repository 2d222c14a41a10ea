"""A user's own objective, in the user's own module: no edit to mmkd.

``examples/my_objective.yaml`` names this module under ``plugins:`` (an importable module, so run with
``PYTHONPATH=examples``), which registers ``angle_kd`` below; its ``objectives:`` entry then uses it like any
built-in one, its keyword parameters set under the entry's `params:`.

angle_kd: the student's embedding of each paired image and caption should sit at the same *angle* from the
others as the teacher's does: the mean squared difference of the two batch cosine-similarity matrices, per
tower (a relational loss in the spirit of RKD's angle term, kept short for the example).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkd


@mmkd.register_objective("angle_kd")
class AngleKd(mmkd.Objective):
    """Match the batch's pairwise cosine similarities, student vs teacher, per tower (image, text)."""

    caption_terms = "text"  # per tower: only the text tower's term reads captions

    def __init__(self, ctx: mmkd.ObjectiveContext, towers: list[str], *, power: float = 2.0) -> None:
        super().__init__(ctx, towers)
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.power = power

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = {}
        for tower in self.towers:
            t = teacher[f"{tower}_embeds"].float()
            s = student[f"{tower}_embeds"][: t.shape[0]].float()  # the teacher's targets: paired samples first
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
            terms[f"angle_{tower}"] = (s @ s.T - t @ t.T).abs().pow(self.power).mean()
        return terms
