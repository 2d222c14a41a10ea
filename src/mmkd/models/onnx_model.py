"""An exported folder (``mmkd export``) as a dual encoder over onnxruntime sessions.

It answers what the evaluation code asks of any model (``encode_image``, ``encode_text``, ``tokenize``, ``meta``,
``logit_scale``), so ``mmkd eval --model DIR`` scores the exported graphs with the very code that scores the
PyTorch student, and the two results can be compared number for number.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
from mmkd.models.onnx_export import EXPORT_FILE, ExportError, read_manifest, session


class OnnxDualEncoder(nn.Module):
    """Two onnxruntime sessions behind the dual-encoder interface; no trainable parameters, CPU only.

    The graphs return normalised embeddings; the evaluation normalises again, which changes nothing.
    """

    def __init__(self, image_session: Any, text_session: Any, meta: EncoderMeta, tokenizer: Any,
                 logit_scale: float, logit_bias: float | None = None, manifest: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.image_session = image_session
        self.text_session = text_session
        self.meta = meta
        self.tokenizer = tokenizer
        self.manifest = manifest or {}
        # log scale, as a DualEncoder holds it; buffers, so .to(device) moves them and nothing counts them as weights
        self.register_buffer("logit_scale", torch.tensor(float(np.log(logit_scale))))
        if logit_bias is not None:
            self.register_buffer("logit_bias", torch.tensor(float(logit_bias)))
        self._dim = int(self.manifest.get("embed_dim", 0))

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def projection_dim(self) -> int:
        return self._dim

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return DualEncoder.tokenize(self, texts)  # type: ignore[arg-type]  # same tokenizer, meta and padding

    def _run(self, modality: str, sess: Any, feeds: dict[str, np.ndarray]) -> torch.Tensor:
        try:
            return torch.from_numpy(sess.run(None, feeds)[0])
        except Exception as e:  # noqa: BLE001 - a graph that ran at the traced shapes only
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise ExportError(f"the {modality} graph fails on {shapes} ({' '.join(str(e).split())[:200]}): it was "
                              "traced with shapes baked in, so it does not run on other batches") from None

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._run("image", self.image_session, {"pixel_values": pixel_values.detach().float().cpu().numpy()})

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("text", self.text_session, {"input_ids": input_ids.detach().cpu().long().numpy(),
                                                     "attention_mask": attention_mask.detach().cpu().long().numpy()})

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if pixel_values is not None:
            out["image_embeds"] = self.encode_image(pixel_values)
        if input_ids is not None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            out["text_embeds"] = self.encode_text(input_ids, mask)
        return out


def is_exported(folder: Path) -> bool:
    return (folder / EXPORT_FILE).is_file()


def load_exported(folder: Path, threads: int | None = None) -> OnnxDualEncoder:
    """The exported folder ``folder`` as a dual encoder (an ExportError names what is missing or damaged)."""
    from mmkd.models.hub import load_tokenizer

    manifest = read_manifest(folder)
    try:
        graphs = {k: folder / manifest["graphs"][k]["file"] for k in ("image", "text")}
        meta = EncoderMeta.from_json(manifest["meta"])
        scale = float(manifest["logit_scale"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{folder / EXPORT_FILE}: lacks or mistypes {e}; export the model again") from None
    for modality, path in graphs.items():
        if not path.is_file():
            raise ExportError(f"{folder}: the {modality} graph {path.name} is missing; copy the whole exported "
                              "folder, or export the model again")
    tokenizer = load_tokenizer(folder, where=f"{folder} (exported)")
    return OnnxDualEncoder(session(graphs["image"], threads), session(graphs["text"], threads), meta, tokenizer,
                           scale, manifest.get("logit_bias"), manifest).eval()


def load_scorable(path_or_id: str, threads: int | None = None) -> Any:
    """What ``mmkd eval --model`` accepts: an exported folder (scored through onnxruntime) or any dual encoder
    ``load_dual_encoder`` loads."""
    from mmkd.models.hub import converted_source, load_dual_encoder

    if converted_source(path_or_id) is None and is_exported(Path(path_or_id)):
        return load_exported(Path(path_or_id), threads)
    return load_dual_encoder(path_or_id)
