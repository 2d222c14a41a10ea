"""Feature distillation: the student's embeddings regress the teacher's (S1, CLIP-KD's FD).

``level: embeds`` compares the normalised projected embeddings; ``level: features`` compares the pooled
pre-projection representations (the CLS vector). Where widths differ, a learnable linear map takes the
student's vector to the teacher's width; it is trained with the student and saved in its checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext

TOWER_KEYS = {"image": "image", "text": "text"}


class FeatureObjective(Objective):
    """Shared plumbing: pick the tower's vectors, map widths, normalise, then a per-sample distance."""

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, level: str = "embeds",
                 normalize: bool = True) -> None:
        super().__init__(ctx, towers)
        if level not in ("embeds", "features"):
            raise ValueError(f"level must be 'embeds' or 'features', got {level!r}")
        self.level = level
        self.normalize = normalize
        self.proj = nn.ModuleDict()
        for tower in self.towers:
            if level == "embeds":
                s_dim, t_dim = ctx.student_embed_dim, ctx.teacher_embed_dim
            else:
                s_dim, t_dim = ctx.student_feature_dims.get(tower), ctx.teacher_feature_dims.get(tower)
            if t_dim is not None and s_dim is not None and s_dim != t_dim:
                self.proj[tower] = nn.Linear(s_dim, t_dim, bias=False)

    def pair(self, tower: str, student: dict[str, Any], teacher: dict[str, Any]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{tower}_{self.level}"
        if key not in teacher:
            raise KeyError(f"the teacher gives no {key!r}; this objective needs it (is the tower cached?)")
        s, t = student[key], teacher[key]
        s = s[: t.shape[0]]  # text targets exist for paired samples only
        if tower in self.proj:
            s = self.proj[tower](s)
        if self.normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t.to(s.dtype), dim=-1)
        return s, t.to(s.dtype)

    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for tower in self.towers:
            s, t = self.pair(tower, student, teacher)
            for name, value in self.distance(s, t).items():
                out[f"{name}_{tower}"] = value
        return out


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance summed over dimensions, averaged over samples (scale-free for unit vectors)."""
    return (s - t).pow(2).sum(-1).mean()


def cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


@OBJECTIVES.register("fd_mse")
class FdMse(FeatureObjective):
    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": mse(s, t)}


@OBJECTIVES.register("fd_cosine")
class FdCosine(FeatureObjective):
    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cosine": cosine(s, t)}


@OBJECTIVES.register("fd_mse_cosine")
class FdMseCosine(FeatureObjective):
    """S1's best: MSE plus cosine distance, each logged separately."""

    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": mse(s, t), "cosine": cosine(s, t)}
