"""Pieces several objective families share: the global batch, similarity logits, and width maps.

Batch-relational losses (everything that compares samples with each other) are computed on the *global*
batch: embeddings are gathered from every rank with gradients, every rank computes the same loss, and the
backward of the gather plus DDP's averaging give exactly the single-process gradient. Per-sample losses
(feature regression) stay local: DDP's averaging of local means is already the global mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.dist import gather_with_grad

# CLIP's cap on the logit scale: above it training destabilises (also enforced on the student by the loop)
MAX_LOGIT_SCALE = 100.0


def paired(d: dict[str, Any], n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of the paired samples (images are paired first, unpaired after)."""
    text = d["text_embeds"]
    n = text.shape[0] if n is None else n
    return d["image_embeds"][:n], text


def gathered(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor concatenated over ranks (identity in one process), gradients kept to the own slice."""
    return [gather_with_grad(x.contiguous()) for x in xs]


def student_scale(student: dict[str, Any], fixed: float | None = None) -> torch.Tensor:
    """The student's (learnable, exp'd) logit scale, or a fixed one."""
    scale = student["logit_scale"]
    if fixed is not None:
        emb = student["image_embeds"]
        return torch.as_tensor(float(fixed), dtype=emb.dtype, device=emb.device)
    return scale.clamp(max=MAX_LOGIT_SCALE)


def teacher_scale(teacher: dict[str, Any], student: dict[str, Any], fixed: float | None = None) -> torch.Tensor:
    """The teacher's logit scale where the targets carry it; else the student's, as a constant."""
    if fixed is not None:
        return student_scale(student, fixed)
    if "logit_scale" in teacher:
        return torch.as_tensor(teacher["logit_scale"]).clamp(max=MAX_LOGIT_SCALE)
    return student["logit_scale"].detach().clamp(max=MAX_LOGIT_SCALE)


def need(teacher: dict[str, Any], key: str, objective: str) -> torch.Tensor:
    if key not in teacher:
        raise KeyError(f"objective {objective!r} needs the teacher's {key!r}, which these targets do not give "
                       f"(they have {sorted(teacher)})")
    return teacher[key]


class WidthMap(nn.Module):
    """Learnable linear maps from the student's embedding width to the teacher's, one per named input.

    Only created where the widths differ; they live in the objective, so the optimizer, DDP and the
    checkpoint see them with the student (CLIP-KD left its projections out of DDP).
    """

    def __init__(self, names: list[str], student_dim: int, teacher_dim: int | None) -> None:
        super().__init__()
        self.maps = nn.ModuleDict()
        if teacher_dim is not None and teacher_dim != student_dim:
            for name in names:
                self.maps[name] = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the teacher's width, re-normalised (unit vectors in, unit vectors out)."""
        if name in self.maps:
            return F.normalize(self.maps[name](x), dim=-1)
        return x


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of row-wise softmax distributions, averaged over rows.

    ``F.kl_div(input, target)`` computes KL(target ‖ input) with ``input`` in log space: the student goes
    first. (The half-depth-CLIP study's code had them the other way round: the reverse, mode-seeking divergence.)
    """
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits.to(student_logits.dtype),
                    dim=-1), reduction="batchmean", log_target=True)
