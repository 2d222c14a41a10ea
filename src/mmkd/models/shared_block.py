"""The unimodal-teacher student: modality-specific towers followed by a final block that both modalities share.

The image tower's tokens and the text tower's tokens are each projected to one common width, then the same
transformer layer(s) process either sequence; the block's pooled output (the image's CLS token, the caption's
mean over real tokens) is the modality's representation. Because the block and its output space are shared,
one target — the unimodal teacher's CLS vector of the image — can be regressed from the image and from the
caption alike. It is still a dual encoder (``encode_image``/``encode_text``), so every evaluation runs on it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmkd.errors import ConfigError
from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
from mmkd.models.towers import tower_width

MODEL_TYPE = "mmkd-shared-block-dual-encoder"


class SharedBlockDualEncoder(DualEncoder):
    """A dual encoder whose towers end in one shared transformer block (``meta.extra['shared_block']``)."""

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, projection_dim: int, meta: EncoderMeta,
                 tokenizer: Any = None, logit_scale_init: float = math.log(1 / 0.07), *, width: int,
                 layers: int = 1, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__(vision_model, text_model, projection_dim, meta, tokenizer, logit_scale_init)
        if width % heads:
            raise ConfigError(f"student.shared: width {width} must be divisible by heads {heads}")
        self.image_in = nn.Linear(tower_width(vision_model), width)
        self.text_in = nn.Linear(tower_width(text_model), width)
        self.shared = nn.ModuleList([
            nn.TransformerEncoderLayer(width, heads, int(mlp_ratio * width), dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)])
        self.shared_norm = nn.LayerNorm(width)
        # the projections start from the shared width, not the towers'
        self.visual_projection = nn.Linear(width, projection_dim, bias=False)
        self.text_projection = nn.Linear(width, projection_dim, bias=False)
        self.meta.extra = {**self.meta.extra, "shared_block": {"width": width, "layers": layers, "heads": heads,
                                                                "mlp_ratio": mlp_ratio}}

    def _block(self, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        for layer in self.shared:
            tokens = layer(tokens, src_key_padding_mask=padding)
        return self.shared_norm(tokens)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if hidden.dim() == 4:  # conv feature map [B, C, H, W] → tokens; no CLS, so pool by mean
            tokens = self._block(self.image_in(hidden.flatten(2).transpose(1, 2)), None)
            return tokens.mean(dim=1)
        return self._block(self.image_in(hidden), None)[:, 0]

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        tokens = self._block(self.text_in(hidden), attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def hf_config(self) -> dict[str, Any]:
        cfg = super().hf_config()
        cfg["model_type"] = MODEL_TYPE  # transformers cannot load the shared block: do not pretend it can
        cfg["architectures"] = ["SharedBlockDualEncoder"]
        return cfg


def shared_block_kwargs(meta: EncoderMeta) -> dict[str, Any] | None:
    return meta.extra.get("shared_block") if meta.extra else None
