"""A dual encoder as two ONNX graphs (image, text), the tokenizer files and ``mmkd_export.json``: what an app needs.

Each graph ends in the L2-normalised embedding, so an app needs no model code: the image graph takes normalised
``pixel_values`` [batch, 3, S, S], the text graph ``input_ids`` and ``attention_mask`` [batch, length]; the batch
(and the text length) are dynamic. The towers are traced (torch's TorchScript exporter, which needs no package
beyond onnx), so anything a tracer bakes in (a Python branch on a shape) is caught by the parity check, not
trusted: an export whose fp32 graphs do not reproduce PyTorch's embeddings (cosine < ``PARITY_MIN``) fails.
int8 graphs come from onnxruntime's quantiser: dynamic for the text graph (activations' ranges vary with the
caption), static with calibration images for the image graph where they are given, dynamic otherwise.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.errors import MmkdError
from mmkd.models.dual_encoder import DualEncoder

EXPORT_FILE = "mmkd_export.json"
FORMAT = "mmkd-onnx"
GRAPHS = {"image": "image.onnx", "text": "text.onnx"}
OPSET = 17
PARITY_MIN = 0.9999  # fp32 ONNX vs PyTorch embeddings: least cosine over the check inputs
INSTALL = "pip install 'mmkd[export]'"


class ExportError(MmkdError, RuntimeError):
    """A model that cannot be exported, or an export that does not reproduce the model: the message says which."""


def require_onnx() -> tuple[Any, Any]:
    """The onnx and onnxruntime modules, or an ExportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"ONNX export and ONNX models need the onnx and onnxruntime packages ({e.name} is "
                          f"missing): {INSTALL}") from None
    return onnx, onnxruntime


class ImageGraph(nn.Module):
    """What the image graph computes: pixels → normalised embedding."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixel_values).float(), dim=-1)


class TextGraph(nn.Module):
    """What the text graph computes: token ids and mask → normalised embedding."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids, attention_mask).float(), dim=-1)


def tower_name(model: DualEncoder, modality: str) -> str:
    """The tower as an error names it: its class and transformers model_type."""
    tower = model.vision_model if modality == "image" else model.text_model
    kind = getattr(getattr(tower, "config", None), "model_type", None)
    return f"{type(tower).__name__}" + (f", model_type {kind}" if kind else "")


def _graph_spec(model: DualEncoder, modality: str, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]
                ) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
    if modality == "image":
        return (ImageGraph(model), (pixels,), ["pixel_values"],
                {"pixel_values": {0: "batch"}, "embeds": {0: "batch"}})
    return (TextGraph(model), (tokens["input_ids"], tokens["attention_mask"]), ["input_ids", "attention_mask"],
            {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
             "embeds": {0: "batch"}})


@contextmanager
def _quiet_fds() -> Iterator[None]:
    """Silence file descriptors 1 and 2: the exporter prints its whole TorchScript graph there (from C++, past
    Python's sys.stdout) when an op does not convert; the error says what matters in one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _sa_block(layer: nn.TransformerEncoderLayer, x: torch.Tensor, attn_mask: torch.Tensor | None,
              key_padding_mask: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
    """nn.TransformerEncoderLayer's self-attention in ops whose shapes stay symbolic when traced (the stock
    ``multi_head_attention_forward`` bakes batch × heads into a reshape): batch-first, packed in-projection."""
    attn = layer.self_attn
    if attn_mask is not None or is_causal or not (attn.batch_first and attn._qkv_same_embed_dim):
        raise ExportError("a shared block with attention masks other than padding, or not batch-first, does not "
                          "export to ONNX")
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], attn.num_heads, -1).transpose(1, 2)

    mask = None
    if key_padding_mask is not None:  # True (or -inf) marks padding: SDPA's boolean mask marks what is attended
        pad = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask < 0
        mask = ~pad[:, None, None, :]
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return layer.dropout1(attn.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)))


@contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Trace nn.TransformerEncoderLayer (the shared block) through ``_sa_block`` and off its fused fast path (an
    op ONNX cannot convert); the model is as it was afterwards."""
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    for layer in layers:
        layer._sa_block = types.MethodType(_sa_block, layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for layer in layers:
            del layer._sa_block


def export_graph(model: DualEncoder, modality: str, path: Path, pixels: torch.Tensor,
                 tokens: dict[str, torch.Tensor], opset: int = OPSET) -> None:
    """Trace one tower (with its pooling, projection and normalisation) into ``path``; an ExportError names the
    tower when it does not export. ``pixels``/``tokens``: example inputs (two or more rows, one padded caption),
    so the traced graph is the general one, not batch 1's."""
    require_onnx()
    graph, args, names, dynamic = _graph_spec(model, modality, pixels, tokens)
    graph.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _traceable(model), _quiet_fds():
            warnings.simplefilter("ignore")  # the tracer's warnings, and the exporter's notice of its successor
            # the TorchScript exporter (torch ≥ 2.5 defaults to the dynamo one, which needs onnxscript too)
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(graph, args, str(path), input_names=names, output_names=["embeds"],
                              dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, **legacy)
    except MmkdError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the tracer or an op's converter refuses
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ExportError(f"the {modality} encoder ({tower_name(model, modality)}) does not export to ONNX: "
                          f"{reason}; export a student whose {modality} tower is one of mmkd's tower families "
                          "(see the README's 'Export to ONNX')") from None


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``path`` (``threads``: intra-op threads, default onnxruntime's)."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # its errors reach the user as ExportErrors; its warnings are not their business
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a damaged or foreign graph file
        raise ExportError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:200]}); export the "
                          "model again") from None


def least_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The least row-wise cosine between two embedding matrices (float64, so the bound is not rounding's)."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).min())


def check_parity(what: str, cosine: float, minimum: float = PARITY_MIN) -> None:
    if not cosine >= minimum:  # a NaN fails too
        raise ExportError(f"{what}: the ONNX graph's embeddings differ from PyTorch's (least cosine {cosine:.6f} < "
                          f"{minimum}); the tower does not trace faithfully (a branch on a shape or a value is "
                          "baked into the graph), so this export is refused")


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over pixel batches (duck-typed: ``get_next`` and ``rewind``)."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self.batches = [b.float().numpy() for b in batches]
        self._it: Iterator[Any] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._it, None)
        return None if batch is None else {"pixel_values": batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def _preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's recommended pre-quantisation pass (shape inference, graph optimisation); the graph as it is
    where the pass does not apply to it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # onnxruntime's symbolic shape inference leaves its partial result in the working directory when it
            # cannot finish (it cannot, on the text graphs): skipped, so nothing lands outside the export
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception:  # noqa: BLE001 - optional: quantisation works on the plain graph too
        return src


def quantize_graph(src: Path, dst: Path, calibration: Sequence[torch.Tensor] | None) -> dict[str, Any]:
    """int8 ``dst`` from fp32 ``src``: static (QDQ, calibrated on ``calibration`` pixel batches) when given, else
    dynamic (weights int8, activations quantised per call). Returns how, and why where static was not used."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    logging.disable(logging.WARNING)  # the quantiser's advice and shape-inference notes go to the root logger
    how: dict[str, Any]
    pre = src
    try:
        pre = _preprocess(src, dst.with_suffix(".pre.onnx"))
        if calibration:
            try:
                quantize_static(str(pre), str(dst), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                                calibrate_method=CalibrationMethod.MinMax)
                return {"mode": "static", "calibration_images": sum(len(b) for b in calibration)}
            except Exception as e:  # noqa: BLE001 - an op static quantisation does not cover: fall back, say so
                how = {"mode": "dynamic", "why": f"static quantisation failed ({' '.join(str(e).split())[:160]})"}
        else:
            how = {"mode": "dynamic", "why": "no calibration images (--calibration)" if dst.stem.startswith("image")
                   else "text activations vary with the caption"}
        # per-channel weight scales: per-tensor ones cost MiniLM's text graph a least cosine of 0.81 (0.98 this way)
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True})
        return how
    finally:
        logging.disable(logging.NOTSET)
        if pre != src:
            pre.unlink(missing_ok=True)
        for extra in dst.parent.glob("*-inferred.onnx"):  # quantize_static's scratch copies
            extra.unlink(missing_ok=True)


def save_tokenizer(tokenizer: Any, folder: Path) -> list[str]:
    """The tokenizer's files in ``folder``; their names (an ExportError when the tokenizer cannot be saved)."""
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise ExportError(f"the model's tokenizer ({type(tokenizer).__name__}) cannot be saved as files; give the "
                          "student a transformers tokenizer (student.tokenizer) and export again")
    before = {p.name for p in folder.iterdir()}
    tokenizer.save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    f = folder / EXPORT_FILE
    try:
        manifest = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{f}: cannot read the export manifest ({e}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ExportError(f"{f}: not an mmkd ONNX export (format {found!r}, expected {FORMAT!r}); export the model "
                          "again with mmkd export")
    return manifest


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished export ``tmp`` to ``out``: an earlier export there is replaced only once the new one is
    whole; anything else there is never touched (the caller refuses it first)."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
