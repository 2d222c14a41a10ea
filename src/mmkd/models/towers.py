"""Hugging Face towers: building them by architecture name, pooling their outputs, finding their layers.

Any AutoModel can be a tower; mmkd only needs to know how to pool it and where its layer stack is, so it
can shrink it (weight inheritance) without model-specific code elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    ResNetConfig,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
)

from mmkd.errors import ConfigError
from mmkd.models.hf_vision import build_hf_vision, hf_vision_types, is_hf_arch, probe
from mmkd.registry import Registry

# arch name → (config class, modality); a new architecture is one line here
ARCHS: Registry[tuple[type[PretrainedConfig], str]] = Registry("tower architecture")
ARCHS.register("clip_vision")((CLIPVisionConfig, "image"))
ARCHS.register("vit")((ViTConfig, "image"))
ARCHS.register("resnet")((ResNetConfig, "image"))
ARCHS.register("bert")((BertConfig, "text"))
ARCHS.register("clip_text")((CLIPTextConfig, "text"))
ARCHS.register("siglip_vision")((SiglipVisionConfig, "image"))
ARCHS.register("siglip_text")((SiglipTextConfig, "text"))

VISION_POOLING = ("pooler", "cls", "mean")
TEXT_POOLING = ("pooler", "cls", "mean", "eos")


def model_from_config(config: PretrainedConfig) -> nn.Module:
    """Instantiate a tower; CLIP sub-configs need their own classes (AutoModel maps them to CLIPModel parts)."""
    if isinstance(config, CLIPVisionConfig):
        return CLIPVisionModel(config)
    if isinstance(config, CLIPTextConfig):
        return CLIPTextModel(config)
    if isinstance(config, SiglipVisionConfig):
        return SiglipVisionModel(config)
    if isinstance(config, SiglipTextConfig):
        return SiglipTextModel(config)
    if isinstance(config, (ViTConfig, BertConfig)):
        return AutoModel.from_config(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def arch_modality(arch: str) -> str:
    """``image`` or ``text``: what a registered architecture, or any ``hf:<model_type>`` (vision), encodes."""
    return "image" if is_hf_arch(arch) else ARCHS.get(arch)[1]


def build_tower(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """A randomly initialised tower of a registered architecture, or of any transformers vision type (``hf:``)."""
    if is_hf_arch(arch):
        return build_hf_vision(arch, kwargs)
    cfg_cls, _ = ARCHS.get(arch)
    try:
        config = cfg_cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"tower config for {arch!r}: {e}") from None
    return model_from_config(config)


def config_from_dict(d: dict[str, Any], where: str = "tower config") -> PretrainedConfig:
    """A saved tower's transformers config; ``where`` names it in errors (e.g. a model folder's config.json)."""
    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{where} has no model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        if "Unrecognized model identifier" not in str(e):
            raise
        raise ConfigError(f"{where}: model_type {model_type!r} is no architecture this installation knows; if a "
                          "plugin registers it, import the plugin first (`mmkd --plugin MODULE …`, or a config's "
                          "plugins:)") from None


def default_pooling(model: nn.Module, modality: str) -> str:
    """Pooling that matches the architecture's own convention (what HF's dual encoders use)."""
    if modality == "image" and is_hf_family(model):
        return "pooler" if probe(model)[1] else "mean"
    if modality == "image":
        return "pooler" if isinstance(model, (CLIPVisionModel, SiglipVisionModel)) or _is_resnet(model) else "cls"
    if isinstance(model, (CLIPTextModel, SiglipTextModel)):
        return "pooler"  # CLIP's EOS token after the final layer norm; SigLIP's last position through its head
    return "mean"


def is_hf_family(model: nn.Module) -> bool:
    """A vision tower of a transformers family mmkd has no entry for (an ``hf:`` tower): its width and pooling
    come from a probe forward rather than from its config."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return model_type in hf_vision_types() and model_type not in {ARCHS.get(n)[0].model_type for n in ARCHS.names()}


def _is_resnet(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "") == "resnet"


def tower_width(model: nn.Module) -> int:
    cfg = model.config
    if getattr(cfg, "model_type", "") == "resnet":
        return int(cfg.hidden_sizes[-1])
    if is_hf_family(model):
        return probe(model)[0]
    if isinstance(model, SiglipTextModel):  # its pooler output leaves through its head
        return int(cfg.projection_size)
    return int(cfg.hidden_size)


def tower_widths(model: Any) -> dict[str, int]:
    """A dual encoder's tower widths (``image``, ``text``): what feature objectives and a cache's identity need."""
    return {"image": tower_width(model.vision_model), "text": tower_width(model.text_model)}


def pool_image(outputs: Any, pooling: str) -> torch.Tensor:
    if pooling == "pooler":
        pooled = outputs.pooler_output
        if pooled is None:
            raise ConfigError("vision tower has no pooler output; set pooling to 'cls' or 'mean'")
        return pooled.flatten(1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 4:  # conv feature map [B, C, H, W]
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    raise ConfigError(f"unknown image pooling {pooling!r}; valid: {', '.join(VISION_POOLING)}")


def text_end_id(tokenizer: Any) -> int | None:
    """The special token id the tokenizer ends every text with (CLIP's ``<|endoftext|>``, BERT's ``[SEP]``), None
    when it ends texts with no special token."""
    ids = list(tokenizer("a photo")["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return int(ids[-1]) if ids and ids[-1] in special else None


def clip_text_ids(tokenizer: Any) -> dict[str, int]:
    """A new ``clip_text`` tower's special ids from its tokenizer: its pooler reads the first position holding
    ``eos_token_id``, and CLIPTextConfig's default (49407, CLIP's own vocabulary) is outside any other tokenizer's."""
    out = {}
    end = text_end_id(tokenizer)
    if end is not None:
        out["eos_token_id"] = end
    first = list(tokenizer("a photo")["input_ids"])[:1]
    if first and first[0] in set(getattr(tokenizer, "all_special_ids", []) or []):
        out["bos_token_id"] = int(first[0])
    if getattr(tokenizer, "pad_token_id", None) is not None:
        out["pad_token_id"] = int(tokenizer.pad_token_id)
    return out


def check_text_pooling(tower: nn.Module, tokenizer: Any, pooling: str, where: str) -> None:
    """Refuse a CLIP text tower whose pooler would read another position than the text's end with this tokenizer.

    CLIPTextModel pools the first position holding ``config.eos_token_id`` (or, with the legacy id 2, the largest
    token id): with a token the tokenizer never writes it silently pools position 0, which under CLIP's causal
    mask sees only the first token: one embedding for every text."""
    if not isinstance(tower, CLIPTextModel) or pooling != "pooler" or tokenizer is None:
        return
    eos, end = tower.config.eos_token_id, text_end_id(tokenizer)
    legacy = eos == 2  # transformers' pre-#24773 configs: the argmax of the ids
    if end is not None and (end == len(tokenizer) - 1 if legacy else eos == end):
        return
    reads = "the largest token id (its legacy eos_token_id 2)" if legacy else f"token id {eos} (its eos_token_id)"
    ends = (f"ends every text with id {end} ({tokenizer.convert_ids_to_tokens(end)!r})" if end is not None
            else "ends texts with no special token")
    fix = (f"set {where}.config.eos_token_id: {end} (a new clip_text tower takes it from its tokenizer when unset), "
           if end is not None else "")
    raise ConfigError(f"{where}: the clip_text tower's pooler reads the position of {reads}, but the tokenizer "
                      f"{ends}, so it would pool the wrong position (position 0 for every text); {fix}or set "
                      f"{where}.pooling: eos (the last real token)")


def pool_text(outputs: Any, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    hidden = outputs.last_hidden_state
    if pooling == "pooler":
        if outputs.pooler_output is None:
            raise ConfigError("text tower has no pooler output; set pooling to 'mean', 'cls' or 'eos'")
        return outputs.pooler_output
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if pooling == "eos":
        last = attention_mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ConfigError(f"unknown text pooling {pooling!r}; valid: {', '.join(TEXT_POOLING)}")


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ModuleList holding the transformer blocks (parent, attribute name, list), found structurally.

    Looks for the ModuleList whose length equals ``config.num_hidden_layers``; works for BERT/MiniLM, ViT,
    CLIP vision and text without per-model code.
    """
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                candidates.append((module, attr, child, f"{name}.{attr}" if name else attr))
    if len(candidates) != 1:
        raise ValueError(
            f"cannot find one layer stack of length {n} in {type(model).__name__} "
            f"(found {[c[3] for c in candidates]}); this architecture cannot be shrunk by layer selection")
    parent, attr, stack, _ = candidates[0]
    return parent, attr, stack


def default_keep(n_layers: int) -> list[int]:
    """Every second layer, always keeping the last one (its output is what the projection was trained on)."""
    keep = list(range(n_layers - 1, -1, -2))[::-1]
    return keep


def shrink_tower(model: nn.Module, keep: list[int] | None = None) -> nn.Module:
    """A copy of ``model`` with only the layers in ``keep`` (weights copied): TinyCLIP-style inheritance."""
    import copy

    n = int(model.config.num_hidden_layers)
    keep = default_keep(n) if keep is None else list(keep)
    if not keep or any(i < 0 or i >= n for i in keep) or sorted(set(keep)) != keep:
        raise ConfigError(f"keep_layers {keep} must be increasing, unique layer indices in 0..{n - 1}")
    new = copy.deepcopy(model)
    parent, attr, stack = layer_stack(new)
    kept = nn.ModuleList([stack[i] for i in keep])
    for new_idx, layer in enumerate(kept):  # some layers carry their index (caches); keep it consistent
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    setattr(parent, attr, kept)
    new.config.num_hidden_layers = len(keep)
    return new
