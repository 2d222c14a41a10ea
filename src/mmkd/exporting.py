"""``mmkd export``: a student folder → ONNX graphs (fp32, or int8), checked against PyTorch before anything is kept.

The graphs are written by ``mmkd.models.onnx_export``; this module adds what needs data and the evaluation code:
the real inputs the parity is checked on, the calibration images of static int8, and the zero-shot top-1 of the
PyTorch model and of each ONNX precision, scored by the same evaluation code (``mmkd.eval``). The export lands
in a temporary folder that replaces ``--out`` only when it is whole and has passed the fp32 parity check.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmkd.config import EvalSpec
from mmkd.data.records import DataError, Record
from mmkd.errors import UsageError
from mmkd.eval.embed import embed_images, embed_texts
from mmkd.eval.suite import pixel_batches
from mmkd.eval.tasks import EvalContext, eval_records, run_spec
from mmkd.models.onnx_export import (
    EXPORT_FILE,
    FORMAT,
    GRAPHS,
    OPSET,
    PARITY_MIN,
    check_parity,
    export_graph,
    least_cosine,
    quantize_graph,
    replace_folder,
    require_onnx,
    save_tokenizer,
    write_manifest,
)
from mmkd.models.onnx_model import load_exported

RESIZE = "resize the shorter side to image_size (bicubic), centre-crop image_size², scale to [0, 1], (x - mean) / std"


def mmkd_version() -> str:
    """The installed distribution's version (``mmkd.__version__`` would import the API, a layer above this)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmkd")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ExportOptions:
    """What ``mmkd export`` takes besides the student (its flags, named alike)."""

    out: Path
    int8: bool = False
    calibration: str | None = None  # a data spec: images for the image graph's static int8
    calibration_n: int = 128
    data: str = "world:test"  # the real images (and captions) parity and zero-shot top-1 are checked on
    limit: int = 256
    class_set: str | None = None
    split: str = "test"
    cache_dir: str = "runs/.cache"
    opset: int = OPSET


def check_out(out: Path) -> None:
    """``--out`` may be new, empty or an earlier export (replaced); anything else there is never overwritten."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_FILE).is_file())):
        raise UsageError(f"--out {out} exists and is not an earlier mmkd export; choose another folder so "
                         "nothing there is overwritten")


def _records(spec: str, limit: int, opts: ExportOptions, flag: str) -> list[Record]:
    try:
        records = list(eval_records(spec, opts.cache_dir, limit, opts.split, limit))
    except ValueError as e:  # a bad spec (ConfigError/DataError are ValueErrors): name the flag
        raise UsageError(f"{flag} {spec}: {e}") from None
    if not records:
        raise UsageError(f"{flag} {spec}: no images found")
    return records


def _texts(records: list[Record], model: Any, opts: ExportOptions) -> list[str]:
    """Captions of the check images, else the zero-shot prompts of their classes."""
    texts = [c for r in records for c in list(r.captions)[:1]]
    if texts:
        return texts
    from mmkd.data.resolve import zeroshot_classes

    names, templates = zeroshot_classes(opts.data, opts.class_set, None, opts.split)
    return [t.format(c, c=c) for c in names for t in templates[:2]]


def _example_inputs(model: Any, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Two images and the shortest and longest of the first texts (one row padded): the general graph is traced."""
    head = sorted(texts[:32], key=len)
    tokens = model.tokenize([head[0], head[-1]])
    example = pixels[:2] if len(pixels) >= 2 else pixels.repeat(2, 1, 1, 1)
    return example, tokens


def _embeddings(model: Any, records: list[Record], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, _ = embed_images(model, pixel_batches(model, records, batch_size=64))
    return images, embed_texts(model, texts, batch_size=64)


def _zeroshot(models: dict[str, Any], opts: ExportOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Zero-shot top-1 of every model on the check images, by the evaluation's own code; for data without class
    labels, why it was not measured (in the manifest and the log)."""
    spec = EvalSpec("zeroshot", opts.data, class_set=opts.class_set, split=opts.split, limit=opts.limit)
    ctx = EvalContext(models, opts.cache_dir, world_n=None, reference=None, log=lambda _: None)
    try:
        result = run_spec(spec, ctx)
    except (DataError, ValueError) as e:  # no labels or no class names: parity was still checked
        why = " ".join(str(e).split())
        log(f"zero-shot top-1 not measured on {opts.data}: {why}")
        return {"top1": None, "not_measured": why}
    return {"top1": {name: r["top1"] for name, r in result.items()}}


def export_student(student: str | Any, opts: ExportOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export ``student`` (a folder, or a dual encoder in memory) into ``opts.out``; returns the manifest written
    there (``mmkd_export.json``)."""
    from mmkd.models.hub import load_dual_encoder

    require_onnx()  # before anything slow
    check_out(opts.out)
    model = load_dual_encoder(student) if isinstance(student, (str, os.PathLike)) else student.eval()
    student = str(student) if isinstance(student, (str, os.PathLike)) else type(student).__name__
    records = _records(opts.data, opts.limit, opts, "--data")
    texts = _texts(records, model, opts)
    calibration = None
    if opts.int8 and opts.calibration:
        cal = _records(opts.calibration, opts.calibration_n, opts, "--calibration")
        calibration = [b for b, _ in pixel_batches(model, cal, batch_size=32)]
    pixels = next(iter(pixel_batches(model, records[:2], batch_size=2)))[0]
    example, tokens = _example_inputs(model, pixels, texts)

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.out.parent / f".{opts.out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _export_into(tmp, model, student, records, texts, example, tokens, calibration, opts, log)
        manifest["mmkd_version"] = mmkd_version()
        write_manifest(tmp, manifest)
        replace_folder(tmp, opts.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _export_into(tmp: Path, model: Any, student: str, records: list[Record], texts: list[str], example: torch.Tensor,
                 tokens: dict[str, Any], calibration: list[torch.Tensor] | None, opts: ExportOptions,
                 log: Callable[[str], None]) -> dict[str, Any]:
    fp32 = tmp / "fp32"
    fp32.mkdir()
    for modality, name in GRAPHS.items():
        log(f"exporting the {modality} tower to ONNX (opset {opts.opset})")
        export_graph(model, modality, fp32 / name, example, tokens, opts.opset)
    tok_files = save_tokenizer(model.tokenizer, tmp)
    manifest = _manifest(model, student, tok_files, opts)
    write_manifest(fp32, manifest)  # fp32/ is a loadable export of its own while it is checked
    for f in tok_files:
        shutil.copy2(tmp / f, fp32 / f)
    onnx_fp32 = load_exported(fp32)
    log(f"checking parity on {len(records)} images and {len(texts)} texts of {opts.data}")
    ref_img, ref_txt = _embeddings(model, records, texts)
    img, txt = _embeddings(onnx_fp32, records, texts)
    parity: dict[str, Any] = {"data": opts.data, "images": len(records), "texts": len(texts), "min_cosine": PARITY_MIN,
                              "fp32": {"image_cosine": least_cosine(ref_img, img),
                                       "text_cosine": least_cosine(ref_txt, txt)}}
    check_parity("the image graph", parity["fp32"]["image_cosine"])
    check_parity("the text graph", parity["fp32"]["text_cosine"])
    models: dict[str, Any] = {"pytorch": model, "onnx_fp32": onnx_fp32}
    final = fp32
    if opts.int8:
        final = tmp / "int8"
        final.mkdir()
        quant = {}
        for modality, name in GRAPHS.items():
            log(f"quantising the {modality} graph to int8")
            quant[modality] = quantize_graph(fp32 / name, final / name, calibration if modality == "image" else None)
            manifest["graphs"][modality]["int8"] = quant[modality]
            log(f"{modality} graph: {quant[modality]['mode']} int8"
                + (f" ({quant[modality]['why']})" if "why" in quant[modality] else ""))
        manifest["precision"] = "int8"
        write_manifest(final, manifest)
        for f in tok_files:
            shutil.copy2(tmp / f, final / f)
        onnx_int8 = load_exported(final)
        img8, txt8 = _embeddings(onnx_int8, records, texts)
        parity["int8"] = {"image_cosine": least_cosine(ref_img, img8), "text_cosine": least_cosine(ref_txt, txt8),
                          "image_cosine_mean": float(torch.nn.functional.cosine_similarity(
                              ref_img.double(), img8.double()).mean()),
                          "text_cosine_mean": float(torch.nn.functional.cosine_similarity(
                              ref_txt.double(), txt8.double()).mean())}
        models["onnx_int8"] = onnx_int8
    manifest["parity"] = parity
    manifest["zeroshot"] = {"data": opts.data, "images": len(records), **_zeroshot(models, opts, log)}
    top1 = manifest["zeroshot"]["top1"]
    if top1 and "onnx_int8" in top1:
        manifest["zeroshot"]["int8_minus_pytorch_points"] = round(100 * (top1["onnx_int8"] - top1["pytorch"]), 2)
    for modality, name in GRAPHS.items():
        shutil.move(str(final / name), str(tmp / name))
        manifest["graphs"][modality]["bytes"] = (tmp / name).stat().st_size
    shutil.rmtree(fp32)
    if final != fp32:
        shutil.rmtree(final)
    return manifest


def _manifest(model: Any, student: str, tok_files: list[str], opts: ExportOptions) -> dict[str, Any]:
    """What an app needs to run the graphs: inputs, preprocessing, tokenisation, scale and width."""
    meta = model.meta
    size, dim = int(meta.image_size), int(model.projection_dim)
    bias = getattr(model, "logit_bias", None)
    return {
        "format": FORMAT, "opset": opts.opset, "precision": "fp32", "source": str(student),
        "graphs": {
            "image": {"file": GRAPHS["image"], "inputs": {"pixel_values": ["batch", 3, size, size]},
                      "input_dtype": "float32", "output": {"embeds": ["batch", dim]}},
            "text": {"file": GRAPHS["text"], "inputs": {"input_ids": ["batch", "length"],
                                                         "attention_mask": ["batch", "length"]},
                     "input_dtype": "int64", "output": {"embeds": ["batch", dim]}},
        },
        "embeddings": "L2-normalised; similarity = logit_scale * cosine" + (" + logit_bias" if bias is not None
                                                                             else ""),
        "image_size": size, "image_mean": list(meta.image_mean), "image_std": list(meta.image_std),
        "image_preprocessing": RESIZE,
        "context_length": int(meta.max_text_length), "text_padding": meta.text_padding,
        "tokenizer_files": tok_files,
        "embed_dim": dim, "logit_scale": float(model.logit_scale.detach().float().exp()),
        "logit_bias": float(bias.detach()) if isinstance(bias, torch.Tensor) else None,
        "meta": meta.to_json(),
    }
