"""The matchers: a dual-encoder teacher with a matching head, and the study's ResNet + MiniLM student.

Heads and student fusions are registered by name. The teacher keeps the dual encoder it was given (its
tokenizer and preprocessing included) and adds a head on the normalised embeddings; the student has its own
image tower (HF ``ResNetModel``, classifier-free) and reads frozen sentence features computed once.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmkd.models.dual_encoder import CLIP_MEAN, CLIP_STD, DualEncoder
from mmkd.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("matching head")
FUSIONS: Registry[type[nn.Module]] = Registry("student fusion")
TRAINABLE = ("all", "vision", "head")


def pair_features(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a, b, a·b, |a−b|]: the usual pair representation, which lets a linear layer see agreement."""
    return torch.cat([a, b, a * b, (a - b).abs()], dim=-1)


@HEADS.register("cosine")
class CosineHead(nn.Module):
    """logit = a · cos(image, text) + b: two numbers on top of what contrastive training already learned."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.scale * (image * text).sum(-1) + self.bias

    @torch.no_grad()
    def calibrate(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> None:
        """Fit (a, b) by logistic regression on the untouched embeddings, so fine-tuning starts sensibly."""
        cos = (image * text).sum(-1).float()
        a = torch.tensor(10.0, requires_grad=True)
        b = torch.tensor(0.0, requires_grad=True)
        opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            with torch.enable_grad():
                loss = F.binary_cross_entropy_with_logits(a * cos + b, labels.float())
                loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        if torch.isfinite(a) and torch.isfinite(b):
            self.scale.copy_(a.detach())
            self.bias.copy_(b.detach())


@HEADS.register("mlp")
class MLPHead(nn.Module):
    """A small MLP over [img, txt, img·txt, |img−txt|] of the normalised embeddings."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.net(pair_features(image, text)).squeeze(-1)


class TeacherMatcher(nn.Module):
    """A dual encoder plus a matching head on its normalised embeddings."""

    def __init__(self, encoder: DualEncoder, head: str = "cosine") -> None:
        super().__init__()
        self.encoder = encoder
        self.head_name = head
        self.head = HEADS.get(head)(encoder.projection_dim)

    def image_embeds(self, pixel_values: torch.Tensor | None = None,
                     features: torch.Tensor | None = None) -> torch.Tensor:
        """From pixels, or from cached pre-projection features when the vision tower is frozen."""
        feats = self.encoder.image_features(pixel_values) if features is None else features
        return F.normalize(self.encoder.visual_projection(feats), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    features: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.encoder.text_features(input_ids, attention_mask) if features is None else features
        return F.normalize(self.encoder.text_projection(feats), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Matching logits from normalised image and text embeddings [B, D] → [B]."""
        return self.head(image, text)

    def set_trainable(self, mode: str) -> None:
        """all: end to end; vision: text tower frozen; head: both towers frozen (projections and head train)."""
        if mode not in TRAINABLE:
            raise ValueError(f"teacher trainable must be one of {', '.join(TRAINABLE)}, got {mode!r}")
        for p in self.parameters():
            p.requires_grad_(True)
        frozen = {"all": [], "vision": [self.encoder.text_model],
                  "head": [self.encoder.text_model, self.encoder.vision_model]}[mode]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.encoder.logit_scale.requires_grad_(False)  # the contrastive temperature plays no part here


def save_teacher_matcher(model: TeacherMatcher, folder: str | Path, info: dict[str, Any]) -> Path:
    """The dual encoder as a normal mmkd model folder, plus head.safetensors and matching.json (atomic)."""
    from mmkd.models.hub import save_dual_encoder

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_dual_encoder(model.encoder, tmp)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.head.state_dict().items()},
              str(tmp / "head.safetensors"))
    (tmp / "matching.json").write_text(json.dumps({"head": model.head_name, **info}, indent=2, allow_nan=False))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_teacher_matcher(folder: str | Path) -> tuple[TeacherMatcher, dict[str, Any]]:
    from mmkd.models.hub import ModelLoadError, load_dual_encoder

    folder = Path(folder)
    info_file, head_file = folder / "matching.json", folder / "head.safetensors"
    if not info_file.is_file() or not head_file.is_file():
        raise ModelLoadError(f"{folder} is not a matching teacher (no matching.json/head.safetensors); train one "
                             "with `mmkd matching train`")
    info = json.loads(info_file.read_text())
    model = TeacherMatcher(load_dual_encoder(folder), info["head"])
    model.head.load_state_dict(load_file(str(head_file)))
    return model.eval(), info


# ------------------------------------------------------------------------------------------------ student


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """The original study's fusion: one linear layer over [image features; text features]. Its logit is a sum
    of an image score and a text score, so it cannot tell which caption goes with which image (a limit, kept on
    purpose for comparison)."""

    def __init__(self, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(image_dim + text_dim, 1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([image, text], dim=-1)).squeeze(-1)


@FUSIONS.register("interact")
class InteractFusion(nn.Module):
    """Image features mapped to the text width, then one linear layer over [img, txt, img·txt, |img−txt|]:
    the original single linear classifier on a pair representation that can express agreement."""

    def __init__(self, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(image_dim, text_dim)
        self.linear = nn.Linear(4 * text_dim, 1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.linear(pair_features(self.project(image), text)).squeeze(-1)


@dataclass
class StudentConfig:
    """The student: a ResNet image tower (random init from ``resnet`` kwargs, or a local folder) and frozen
    sentence features, joined by a registered fusion."""

    resnet: dict[str, Any] | str = field(default_factory=lambda: dict(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic"))
    fusion: str = "interact"
    image_size: int = 32
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        FUSIONS.get(self.fusion)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)  # a YAML list → a tuple
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std take three numbers (R, G, B)")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if isinstance(self.resnet, str) and not Path(self.resnet).is_dir():
            raise ValueError(f"resnet folder {self.resnet} not found; give a local folder saved by "
                             "ResNetModel.save_pretrained, or ResNetConfig kwargs")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MatchingStudent(nn.Module):
    """ResNet pooled features + frozen sentence features → fusion → one matching logit."""

    def __init__(self, cfg: StudentConfig, text_dim: int) -> None:
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        if isinstance(cfg.resnet, str):
            self.resnet = ResNetModel.from_pretrained(cfg.resnet)  # a classification head, if any, is dropped
        else:
            try:
                self.resnet = ResNetModel(ResNetConfig(**cfg.resnet))
            except TypeError as e:
                raise ValueError(f"student resnet config: {e}") from None
        self.cfg = cfg
        self.image_dim = int(self.resnet.config.hidden_sizes[-1])
        self.fusion = FUSIONS.get(cfg.fusion)(self.image_dim, text_dim)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.resnet(pixel_values=pixel_values).pooler_output.flatten(1)

    def forward(self, pixel_values: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.image_features(pixel_values), text_features)
