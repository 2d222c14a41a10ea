"""An image-only (unimodal) teacher: any Hugging Face vision model, or the image tower of a dual encoder.

It answers one question per image: its pooled (CLS) representation. It has no text side, no projection and
no logit scale; objectives that need those fail naming what is missing.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, CLIPModel, CLIPVisionModel

from mmkd.models.dual_encoder import EncoderMeta
from mmkd.models.hub import LOADERS, load_dual_encoder, resolve
from mmkd.models.model_files import ModelLoadError, image_settings, read_config
from mmkd.models.towers import default_pooling, pool_image


class ImageTeacher(nn.Module):
    """A vision tower with its pooling and preprocessing: ``image_features(pixels) -> [B, width]``."""

    text_model = None
    tokenizer = None
    visual_projection = None
    projection_dim = None

    def __init__(self, vision_model: nn.Module, meta: EncoderMeta) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.meta = meta

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pool_image(self.vision_model(pixel_values=pixel_values), self.meta.vision_pooling)


def load_image_teacher(path_or_id: str | os.PathLike, pooling: str | None = None) -> ImageTeacher:
    """A dual-encoder folder (its image tower alone) or any HF vision model folder/hub id.

    pooling: default the architecture's own (CLIP's pooler, ViT's CLS token; the dual encoder's setting).
    """
    folder = resolve(path_or_id)
    cfg = read_config(folder)
    if cfg.get("model_type") in LOADERS:
        de = load_dual_encoder(folder)
        meta = EncoderMeta(vision_pooling=pooling or de.meta.vision_pooling, image_size=de.meta.image_size,
                           image_mean=de.meta.image_mean, image_std=de.meta.image_std)
        return ImageTeacher(de.vision_model, meta).eval()
    try:
        model: Any = AutoModel.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"cannot load a vision model from {folder}: {e}") from None
    if isinstance(model, CLIPModel):
        model = load_dual_encoder(folder).vision_model
    if not hasattr(model.config, "image_size") and getattr(model.config, "model_type", "") != "resnet":
        raise ModelLoadError(f"{folder}: {type(model).__name__} is not an image model (no image_size in its "
                             "config); teacher_modality: image needs a vision model")
    image_size = int(getattr(model.config, "image_size", 224))
    settings = image_settings(folder, image_size)
    vision_pooling = pooling or default_pooling(model, "image")
    if vision_pooling == "pooler" and not isinstance(model, CLIPVisionModel) and getattr(model, "pooler", 1) is None:
        vision_pooling = "cls"
    meta = EncoderMeta(vision_pooling=vision_pooling, **settings)
    return ImageTeacher(model, meta).eval()
