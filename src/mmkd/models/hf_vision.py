"""Any transformers vision model as a student image tower: ``arch: hf:<model_type>`` with its config dict.

Why: the students that win on devices (MobileViT, ConvNeXt, EfficientNet, MobileNet, LeViT, RegNet) ship with
transformers; building them from ``AutoConfig.for_model`` + ``AutoModel.from_config`` needs no per-family code.
What does differ per family (the pooled width, whether a pooled output exists) is found by one probe forward,
so a family transformers adds later works unchanged. A type that is no pixel-input tower, or that transformers
cannot build from a config alone, is refused naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, MODEL_MAPPING_NAMES

from mmkd.errors import ConfigError

HF_PREFIX = "hf:"
# image-classification backbones that are not a tower mmkd can pool: why, for the refusal
NOT_TOWERS = {
    "clip": "a whole dual encoder (use arch clip_vision)",
    "siglip": "a whole dual encoder (use arch siglip_vision)",
    "siglip2": "a whole dual encoder",
    "metaclip_2": "a whole dual encoder",
    "perceiver": "not a pixel-input vision tower",
    "imagegpt": "a pixel-token language model, not a pixel-input vision tower",
    "timm_wrapper": "a wrapper around a timm checkpoint name: transformers cannot build it from a config alone",
    "hgnet_v2": "a feature-map backbone without a pooled image output",
    "textnet": "a text-detection backbone",
    "segformer": "a segmentation encoder without a pooled image output",
}


def is_hf_arch(arch: str) -> bool:
    return arch.startswith(HF_PREFIX)


def hf_vision_types() -> list[str]:
    """The transformers model types an ``hf:`` tower may name: image-classification backbones with a base model."""
    return [t for t in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if t in MODEL_MAPPING_NAMES and t not in NOT_TOWERS]


def _valid() -> str:
    return ", ".join(HF_PREFIX + t for t in hf_vision_types())


def build_hf_vision(arch: str, kwargs: dict[str, Any], where: str = "student.vision") -> nn.Module:
    """A randomly initialised ``hf:<model_type>`` tower whose pooled output a projection can read."""
    model_type = arch[len(HF_PREFIX):]
    if model_type in NOT_TOWERS:
        raise ConfigError(f"{where}.arch {arch!r} is {NOT_TOWERS[model_type]}; valid: {_valid()}")
    if model_type not in hf_vision_types():
        raise ConfigError(f"{where}.arch {arch!r} is not a transformers vision model type; valid: {_valid()}")
    known = set(CONFIG_MAPPING[model_type]().to_dict())
    unknown = sorted(set(kwargs) - known)
    if unknown:  # transformers would keep a misspelt key as an attribute and silently build the default
        raise ConfigError(f"{where}.config: {', '.join(map(repr, unknown))} is not a setting of {arch} "
                          f"({CONFIG_MAPPING[model_type].__name__}); its settings: {', '.join(sorted(known))}")
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
        model = AutoModel.from_config(config)
    except Exception as e:  # missing optional packages (natten, timm), inconsistent settings
        raise ConfigError(f"{where}: transformers cannot build {arch} from this config "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        probe(model)
    except Exception as e:
        raise ConfigError(f"{where}: {arch} gives no pooled image output for a {probe_size(model)}-pixel image "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); set config.image_size "
                          f"or pick another type; valid: {_valid()}") from None
    return model


def probe_size(model: nn.Module) -> int:
    size = getattr(model.config, "image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def probe(model: nn.Module) -> tuple[int, bool]:
    """(pooled width, whether the model has a pooler output), from one forward of a blank image in eval mode
    (batch norms keep their statistics); remembered on the module, so it runs once per tower."""
    found = getattr(model, "_mmkd_probe", None)
    if found is not None:
        return found
    param = next(model.parameters())
    size = probe_size(model)
    x = torch.zeros(1, int(getattr(model.config, "num_channels", 3)), size, size, device=param.device,
                    dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(pixel_values=x)
    finally:
        model.train(was_training)
    pooled = getattr(out, "pooler_output", None)
    t = pooled if pooled is not None else out.last_hidden_state
    if t.dim() not in (2, 3, 4):
        raise ValueError(f"output of shape {tuple(t.shape)}")
    found = (int(t.shape[-1] if t.dim() == 3 else t.shape[1]), pooled is not None)
    object.__setattr__(model, "_mmkd_probe", found)
    return found
