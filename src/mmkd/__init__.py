"""mmkd: multimodal knowledge distillation for CLIP-style dual encoders."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path: str, **kwargs):
    """Load a dual encoder saved by mmkd, a CLIPModel or a VisionTextDualEncoderModel (folder or hub id)."""
    from mmkd.models.hub import load_dual_encoder

    return load_dual_encoder(path, **kwargs)


__all__ = ["__version__", "load"]
