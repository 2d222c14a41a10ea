"""Objectives over a teacher ensemble: the generic rule for objectives that know one teacher only.

A teacher-using objective without native ensemble support (``Objective.handles_ensembles``) is built once per
teacher, each with the ObjectiveContext of its teacher (so ``fd_*`` get one learnable width map per teacher), and
its loss is the mean over teachers. Its checkpoint keys gain ``members.<i>.``; a single teacher never meets
this wrapper, so its objectives and checkpoints stay exactly as they were.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkd.teacher.ensemble import MEMBERS


def member_targets(teacher: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-teacher target dicts: an ensemble's members, or the one teacher's targets as a list of one."""
    members = teacher.get(MEMBERS)
    return list(members) if members is not None else [teacher]


class PerTeacher(nn.Module):
    """One instance of an objective per teacher; ``forward`` gives the mean of their terms and each teacher's own."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    # what the pipeline asks of an objective (which arrays a cache must hold, whether a teacher is needed)
    @property
    def uses_teacher(self) -> bool:
        return bool(self.members[0].uses_teacher)

    @property
    def teacher_features(self) -> bool:
        return bool(self.members[0].teacher_features)

    @property
    def towers(self) -> list[str]:
        return list(self.members[0].towers)

    @property
    def caption_terms(self) -> str:
        return str(getattr(self.members[0], "caption_terms", "all"))

    @property
    def exact_accumulation(self) -> bool:
        return all(getattr(m, "exact_accumulation", True) for m in self.members)

    @property
    def image_mask_ratio(self) -> float | None:
        return getattr(self.members[0], "image_mask_ratio", None)

    @property
    def level(self) -> str:
        return str(getattr(self.members[0], "level", "embeds"))

    def forward(self, student: dict[str, Any], teachers: list[dict[str, Any]]
                ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """(mean over teachers of every term, each teacher's terms)."""
        if len(teachers) != len(self.members):
            raise ValueError(f"{len(self.members)} teachers' objectives but targets of {len(teachers)} teachers")
        per = [obj(student, t) for obj, t in zip(self.members, teachers)]
        mean = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
        return mean, per
