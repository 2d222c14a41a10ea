"""Feature distillation: the student's embeddings regress the teacher's (the half-depth-CLIP recipe, CLIP-KD's FD).

Two spaces. ``level: embeds`` compares the projected embeddings, which both models give as unit vectors; there
``‖s − t‖² = 2·(1 − cos(s, t))``, so ``fd_mse``, ``fd_cosine`` and ``fd_mse_cosine`` are one loss at three
scales (``fd_mse`` = 2/d × ``fd_cosine`` with its mean reduction, d the width). ``level: features`` compares
the pooled pre-projection representations (the CLS vector), unit-normalised (``normalize: true``) or raw
(``normalize: false``): only in the raw space does MSE see lengths, and so differ from the cosine distance.
Where widths differ, a learnable linear map takes the student's vector to the teacher's width; it is trained
with the student and saved in its checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.errors import ConfigError
from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext


class FeatureObjective(Objective):
    """Shared plumbing: pick the tower's vectors, map widths, normalise, then a per-sample distance."""

    caption_terms = "text"  # per tower: only the text tower's terms read captions

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, level: str = "embeds",
                 normalize: bool = True) -> None:
        super().__init__(ctx, towers)
        if level not in ("embeds", "features"):
            raise ConfigError(f"level must be 'embeds' or 'features', got {level!r}")
        if level == "embeds" and not normalize:  # the models' embeddings are unit vectors: nothing to leave raw
            raise ConfigError("normalize: false needs level: features: the models' embeddings (level: embeds) "
                              "are unit vectors, so there is no unnormalised space at that level; set level: "
                              "features to compare the raw pooled pre-projection vectors")
        self.level = level
        self.teacher_features = level == "features"
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


def mse_mean(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared difference averaged over samples *and* dimensions: torch's ``F.mse_loss``, CLIP-KD's FD."""
    return (s - t).pow(2).mean()


MSE_REDUCTIONS = {"mean": mse_mean, "sum": mse}  # "sum": over dimensions (then the mean over samples)


def cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


class _MseObjective(FeatureObjective):
    """A feature objective with an MSE term whose reduction over dimensions is a parameter."""

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, level: str = "embeds", normalize: bool = True,
                 reduction: str = "mean") -> None:
        super().__init__(ctx, towers, level=level, normalize=normalize)
        if reduction not in MSE_REDUCTIONS:
            raise ConfigError(f"reduction must be one of {', '.join(MSE_REDUCTIONS)}, got {reduction!r}")
        self.mse = MSE_REDUCTIONS[reduction]


@OBJECTIVES.register("fd_mse")
class FdMse(_MseObjective):
    """CLIP-KD's feature distillation: ``F.mse_loss`` (the mean over samples and dimensions) per tower, so
    CLIP-KD's weights transfer as they are (its 2000). ``reduction: sum`` sums over dimensions instead (d times
    the mean: divide a weight by d to keep a run's meaning across the two)."""

    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": self.mse(s, t)}


@OBJECTIVES.register("fd_cosine")
class FdCosine(FeatureObjective):
    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cosine": cosine(s, t)}


@OBJECTIVES.register("fd_mse_cosine")
class FdMseCosine(_MseObjective):
    """The half-depth-CLIP study's best: MSE plus cosine distance, each logged separately. Its MSE sums over
    dimensions by default (mmkd's weights for it, which S1 published none of, were set that way)."""

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, level: str = "embeds", normalize: bool = True,
                 reduction: str = "sum") -> None:
        super().__init__(ctx, towers, level=level, normalize=normalize, reduction=reduction)

    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": self.mse(s, t), "cosine": cosine(s, t)}


# ----------------------------------------------------------------------------------------------------------
# masked feature distillation (CLIP-KD's MFD)


def patch_embeddings_module(tower: nn.Module) -> nn.Module:
    """The module that turns pixels into [B, 1 + patches, D] tokens (CLS first) in CLIP-vision and ViT towers."""
    emb = getattr(tower, "embeddings", None)
    if emb is None and hasattr(tower, "vision_model"):  # transformers 4.x nests CLIP's transformer one deeper
        emb = getattr(tower.vision_model, "embeddings", None)
    if emb is None or not (hasattr(emb, "patch_embedding") or hasattr(emb, "patch_embeddings")):
        raise ConfigError(f"mfd masks image patches, which needs a ViT-style vision tower (clip_vision, vit); "
                         f"{type(tower).__name__} has no patch embeddings")
    return emb


def keep_indices(batch: int, patches: int, mask_ratio: float, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """For every image, the sorted indices of the ``round((1 − ratio)·patches)`` patches it keeps (≥ 1)."""
    keep = max(1, round((1.0 - mask_ratio) * patches))
    noise = torch.rand(batch, patches, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def masked_image_features(model: Any, pixel_values: torch.Tensor, mask_ratio: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """The student's pooled image features when it sees only a random subset of each image's patches.

    Masked patches are *dropped* after the patch and position embeddings (a forward hook on the embeddings
    module keeps the CLS token and the kept patches), as MAE and FLIP do, rather than zeroed: a zeroed token is
    still a token the encoder attends to, an input it never sees at test time, while a dropped one is simply
    absent; and the masked forward costs only the kept fraction of the attention and MLP compute.
    """
    emb = patch_embeddings_module(model.vision_model)

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        idx = keep_indices(out.shape[0], out.shape[1] - 1, mask_ratio, out.device, generator) + 1
        patches = out.gather(1, idx[:, :, None].expand(-1, -1, out.shape[2]))
        return torch.cat([out[:, :1], patches], dim=1)

    handle = emb.register_forward_hook(hook)
    try:
        return model.image_features(pixel_values)
    finally:
        handle.remove()


@OBJECTIVES.register("mfd")
class MaskedFeatureDistillation(_MseObjective):
    """CLIP-KD's masked feature distillation: while training, the student runs ONCE on images with ``mask_ratio``
    of their patches masked (CLIP-KD's ``model(images, texts, distill=True, mask_ratio=args.mask_ratio)``, 0.75 in
    its scripts), every objective reads that forward, and this term regresses the teacher's embedding of the whole
    image on it (``F.mse_loss`` of normalised vectors, as CLIP-KD's FD and fd_mse: the mean over samples and
    dimensions, so its weights transfer; ``reduction: sum`` for the sum over dimensions). It only declares the
    mask (``image_mask_ratio``); the task masks the forward (`masked_image_features`). Image tower only; every
    image of the batch, unpaired ones included. Needs a ViT-style student.
    """

    default_towers = ("image",)

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, mask_ratio: float = 0.75,
                 level: str = "embeds", normalize: bool = True, reduction: str = "mean") -> None:
        if list(towers) != ["image"]:  # the text tower has no patches to mask: refuse rather than ignore
            raise ValueError(f"mfd masks image patches, so it applies to towers [image] only; got towers {towers}: "
                             "leave 'towers' out or set it to [image], and add fd_* for the text tower")
        super().__init__(ctx, towers, level=level, normalize=normalize, reduction=reduction)
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mfd: mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.image_mask_ratio = self.mask_ratio or None  # 0: the plain forward

    def distance(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": self.mse(s, t)}


# ----------------------------------------------------------------------------------------------------------
# a multimodal student regressing a unimodal (image-only) teacher


@OBJECTIVES.register("cls_regression")
class ClsRegression(Objective):
    """The unimodal-teacher objective: the student's pooled output for an image *and* for its caption both regress the
    teacher's pooled image representation (its CLS vector) of that image. Terms ``image`` and ``caption``
    (logged separately: the caption side cannot reach the image side, the CLS holds image-only detail).

    One shared linear head maps the student's width to the teacher's (the student's final block is shared by
    both modalities, so is the head). distance: ``mse`` (squared L2) or ``cosine``; normalize: compare unit
    vectors.
    """

    teacher_features = True
    caption_terms = "text"  # the ``caption`` term reads captions, the ``image`` term does not

    def __init__(self, ctx: ObjectiveContext, towers: list[str], *, distance: str = "mse",
                 normalize: bool = True) -> None:
        super().__init__(ctx, towers)
        if distance not in ("mse", "cosine"):
            raise ConfigError(f"cls_regression: distance must be 'mse' or 'cosine', got {distance!r}")
        self.distance, self.normalize = distance, normalize
        s_dim = ctx.student_feature_dims.get("image")
        t_dim = ctx.teacher_feature_dims.get("image")
        if s_dim is not None and ctx.student_feature_dims.get("text", s_dim) != s_dim:
            raise ConfigError("cls_regression needs one width for the student's image and caption outputs "
                             f"(got {ctx.student_feature_dims}); use a student with a shared final block")
        self.head = nn.Linear(s_dim, t_dim, bias=False) if s_dim and t_dim and s_dim != t_dim else nn.Identity()

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "image_features" not in teacher:
            raise KeyError("cls_regression needs the teacher's image_features (its pooled CLS representation)")
        target = teacher["image_features"]
        n = int(student["n_paired"])
        out = {}
        for tower, name in (("image", "image"), ("text", "caption")):
            if tower not in self.towers:
                continue
            s = self.head(student[f"{tower}_features"])
            t = (target if tower == "image" else target[:n]).to(s.dtype)
            s = s[: t.shape[0]]
            if self.normalize:
                s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
            out[name] = mse(s, t) if self.distance == "mse" else cosine(s, t)
        return out
