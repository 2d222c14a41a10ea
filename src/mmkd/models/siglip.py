"""SigLIP folders (transformers' ``SiglipModel``) as mmkd dual encoders; SigLIP 2 refused with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmkd.models.dual_encoder import SIGLIP_MEAN, SIGLIP_STD, EncoderMeta, SiglipDualEncoder
from mmkd.models.model_files import ModelLoadError, image_settings


def siglip_meta(folder: Path, cfg: dict[str, Any], hf: Any) -> EncoderMeta:
    """mmkd's settings saved with the model, else SigLIP's: pooled heads, its processor's size/mean/std and
    text padded to the full length (the text head pools the last position, so the length is part of the model)."""
    if "mmkd" in cfg:
        return EncoderMeta.from_json(cfg["mmkd"])
    settings = image_settings(folder, int(hf.config.vision_config.image_size), SIGLIP_MEAN, SIGLIP_STD)
    return EncoderMeta(vision_pooling="pooler", text_pooling="pooler", text_padding="max_length",
                       max_text_length=int(hf.config.text_config.max_position_embeddings), **settings)


def load_siglip(folder: Path, cfg: dict[str, Any], tokenizer: Any) -> SiglipDualEncoder:
    from transformers import SiglipModel, SiglipTextConfig

    vocab = int((cfg.get("text_config") or {}).get("vocab_size", SiglipTextConfig().vocab_size))
    if tokenizer is not None and len(tokenizer) > vocab:  # ids past the table would fail mid-run, or worse
        raise ModelLoadError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the text tower's vocabulary "
                             f"is {vocab}; the tokenizer files belong to another model: put SigLIP's own there")
    try:
        hf = SiglipModel.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"cannot load SiglipModel from {folder}: {e}") from None
    meta = siglip_meta(folder, cfg, hf)
    if meta.vision_pooling != "pooler" or meta.text_pooling != "pooler":
        raise ModelLoadError(f"{folder}: a SigLIP folder pools with its own heads; its mmkd poolings "
                             f"({meta.vision_pooling}, {meta.text_pooling}) must be 'pooler'")
    try:
        model = SiglipDualEncoder(hf.vision_model, hf.text_model, meta, tokenizer)
    except ValueError as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    with torch.no_grad():
        model.logit_scale.copy_(hf.logit_scale.reshape(()))
        model.logit_bias.copy_(hf.logit_bias.reshape(()))
    return model


def refuse_siglip2(folder: Path, cfg: dict[str, Any], tokenizer: Any) -> Any:
    raise ModelLoadError(f"{folder}: SigLIP 2 (Siglip2Model) is not supported: its vision tower takes NaFlex "
                         "patch sequences with spatial shapes and masks, not fixed-size images, which mmkd's image "
                         "pipeline does not produce; use a SigLIP (SiglipModel) teacher")
