"""The dual encoder every teacher and student is: two HF towers, pooling, projections and a logit scale.

Parameter names follow transformers' ``VisionTextDualEncoderModel`` (vision_model, text_model,
visual_projection, text_projection, logit_scale), so a saved student is also a checkpoint transformers reads
on its own; pooling and preprocessing settings travel in the config's ``mmkd`` section.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.models.towers import pool_image, pool_text, tower_width

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor's defaults


@dataclass
class EncoderMeta:
    """What a dual encoder needs besides weights: pooling, preprocessing and tokenisation settings."""

    vision_pooling: str = "pooler"
    text_pooling: str = "pooler"
    image_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_text_length: int = 77
    text_padding: str = "longest"  # "max_length" for SigLIP: its text tower pools the last position
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EncoderMeta:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("image_mean", "image_std"):
            if k in known:
                known[k] = tuple(float(x) for x in known[k])
        return cls(**known)


class DualEncoder(nn.Module):
    """A CLIP-style image–text model over arbitrary Hugging Face towers."""

    def __init__(
        self,
        vision_model: nn.Module,
        text_model: nn.Module,
        projection_dim: int,
        meta: EncoderMeta,
        tokenizer: Any = None,
        logit_scale_init: float = math.log(1 / 0.07),
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.text_model = text_model
        self.visual_projection = nn.Linear(tower_width(vision_model), projection_dim, bias=False)
        self.text_projection = nn.Linear(tower_width(text_model), projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.meta = meta
        self.tokenizer = tokenizer

    # -- conveniences the evaluation and training code rely on
    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def projection_dim(self) -> int:
        return self.visual_projection.out_features

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this dual encoder has no tokenizer; load it from a folder with tokenizer files")
        padding = "max_length" if self.meta.text_padding == "max_length" else True
        enc = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.meta.max_text_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # -- encoders
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled vision-tower output before projection (the CLS/pooled representation)."""
        out = self.vision_model(pixel_values=pixel_values)
        return pool_image(out, self.meta.vision_pooling)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return pool_text(out, attention_mask, self.meta.text_pooling)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.image_features(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_features(input_ids, attention_mask))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embeddings (L2-normalised) and pre-projection features of whichever inputs are given."""
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if pixel_values is not None:
            feats = self.image_features(pixel_values)
            out["image_features"] = feats
            out["image_embeds"] = F.normalize(self.visual_projection(feats), dim=-1)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            feats = self.text_features(input_ids, attention_mask)
            out["text_features"] = feats
            out["text_embeds"] = F.normalize(self.text_projection(feats), dim=-1)
        return out

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors a save writes, named as the transformers class of ``hf_config`` expects."""
        return self.state_dict()

    def save_extras(self, folder: str) -> None:
        """Files besides config, weights and tokenizer that a save writes (none for the plain dual encoder)."""

    def hf_config(self) -> dict[str, Any]:
        """A ``VisionTextDualEncoderConfig``-compatible dict with mmkd's settings under ``mmkd``."""
        vc = self.vision_model.config.to_dict()
        tc = self.text_model.config.to_dict()
        return {
            "model_type": "vision-text-dual-encoder",
            "architectures": ["VisionTextDualEncoderModel"],
            "vision_config": vc,
            "text_config": tc,
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": float(self.logit_scale.detach()),
            "mmkd": self.meta.to_json(),
        }


class IdentityProjection(nn.Module):
    """A projection that is not there: SigLIP's towers end in their own heads, the embedding is their output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_features = self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SiglipDualEncoder(DualEncoder):
    """transformers' ``SiglipModel`` as a dual encoder: the vision tower's attention-pooling head output and the
    text tower's head output (its last position) are the embeddings, no projections; similarity is
    ``exp(logit_scale) * cos + logit_bias`` (the bias is learnt, as SigLIP's sigmoid loss needs it).

    Parameter names are SiglipModel's, so a saved student is a checkpoint ``SiglipModel.from_pretrained`` reads.
    The logit scale is not capped at 100 (SigLIP's is not; trained ones reach ~117).
    """

    max_logit_scale = float("inf")

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, meta: EncoderMeta, tokenizer: Any = None,
                 logit_scale_init: float = math.log(10.0), logit_bias_init: float = -10.0) -> None:
        width, text_width = tower_width(vision_model), tower_width(text_model)
        if width != text_width:
            raise ValueError(f"a SigLIP model needs the vision width ({width}) equal to the text head's "
                             f"projection_size ({text_width})")
        super().__init__(vision_model, text_model, width, meta, tokenizer, logit_scale_init)
        self.visual_projection = IdentityProjection(width)
        self.text_projection = IdentityProjection(width)
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias_init)))

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(pixel_values, input_ids, attention_mask)
        out["logit_bias"] = self.logit_bias
        return out

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        for k in ("logit_scale", "logit_bias"):  # SiglipModel holds them as [1]
            state[k] = state[k].reshape(1)
        return state

    def save_extras(self, folder: str) -> None:
        from transformers import SiglipImageProcessor

        SiglipImageProcessor(size={"height": self.image_size, "width": self.image_size},
                             image_mean=list(self.meta.image_mean), image_std=list(self.meta.image_std)
                             ).save_pretrained(folder)

    def hf_config(self) -> dict[str, Any]:
        from transformers import SiglipConfig

        cfg = SiglipConfig(text_config=self.text_model.config.to_dict(),
                           vision_config=self.vision_model.config.to_dict()).to_dict()
        cfg["architectures"] = ["SiglipModel"]
        cfg["mmkd"] = self.meta.to_json()
        return cfg
