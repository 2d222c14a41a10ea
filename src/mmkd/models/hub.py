"""Loading and saving dual encoders: mmkd folders, transformers' CLIPModel and VisionTextDualEncoderModel.

A model is a folder (or hub id) holding ``config.json``, ``model.safetensors`` and tokenizer files. Saving
is atomic: a crash mid-save never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel, VisionTextDualEncoderModel

from mmkd.errors import ConfigError
from mmkd.fileio import disk_full_error, is_disk_full
from mmkd.models import siglip
from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
from mmkd.models.model_files import (
    MINILM,
    PACKAGE_PREFIX,
    PACKAGED_MODELS,
    WEIGHT_FILES,
    ModelLoadError,
    check_tokenizer,
    drop_unused_pooler,
    first_nonfinite,
    image_settings,
    load_plain_tokenizer,
    load_strict,
    load_weights_file,
    looks_local,
    packaged_model,
    read_config,
    read_state_dict,
    relative_note,
    weights_file,
)
from mmkd.models.onnx_export import EXPORT_FILE
from mmkd.models.open_clip import load_open_clip, open_clip_tokenizer, parse_spec
from mmkd.models.towers import config_from_dict, model_from_config

# what callers import from here; the model files' helpers among them are re-exported (they lived here before)
__all__ = ["CONVERTED_SOURCES", "LOADERS", "MINILM", "ConvertedSource", "ModelLoadError", "check_finite",
           "check_model_path", "check_tokenizer", "converted_source", "drop_unused_pooler", "first_nonfinite",
           "load_dual_encoder", "load_tokenizer", "load_weights_file", "read_config", "resolve", "save_dual_encoder"]


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; ``package:NAME`` from an installed package; else a hub id fetched into the hub
    cache (fails clearly offline)."""
    text = str(path_or_id)
    if text.startswith(PACKAGE_PREFIX):
        return packaged_model(text[len(PACKAGE_PREFIX):])
    if converted_source(text) is not None:
        raise ModelLoadError(f"{text}: a checkpoint converted on load is accepted where a whole dual encoder is "
                             "(teacher, student tower source, eval --model, cache --teacher), not here")
    p = Path(path_or_id)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; a model is a folder with config.json and weights")
        return p
    if looks_local(text):
        raise ModelLoadError(f"model folder {p} not found{relative_note(p)}; check the path (a hub id is ORG/NAME)")
    packaged = next((PACKAGE_PREFIX + k for k, (_, hub_id) in PACKAGED_MODELS.items() if hub_id == text), None)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id)))
    except Exception as e:  # offline, unknown id, auth: all mean the same to the user
        raise ModelLoadError(
            f"model {str(path_or_id)!r} is neither a local folder nor a downloadable hub id ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); download it on a machine with access and pass "
            "the folder" + (f", or use {packaged} (the same weights, installed)" if packaged else "")) from None


def check_model_path(value: str, key: str) -> None:
    """Before any compute: a model named as a local folder (or ``open_clip:FOLDER``) must exist; a ConfigError
    names ``key``. Hub ids and ``package:`` models are resolved when loaded."""
    prefix = converted_source(value)
    text = value[len(prefix) + 1:].split("?")[0] if prefix is not None else value
    tokenizer = value.partition("?tokenizer=")[2] if prefix is not None else ""
    if tokenizer:  # open_clip:FOLDER?tokenizer=T: the tokenizer is read too
        check_model_path(tokenizer, f"{key} (?tokenizer=)")
    if text.startswith(PACKAGE_PREFIX):
        return
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}: {p} is a file; a model is a folder with config.json and weights")
    elif prefix is not None or looks_local(text):
        raise ConfigError(f"{key}: model folder {p} not found{relative_note(p)}; fix the path (nothing was "
                          "computed)")


def load_tokenizer(path: str | os.PathLike, where: str | None = None) -> Any:
    """A tokenizer from a folder, hub id, ``package:NAME`` or a converted source (``open_clip:FOLDER``)."""
    prefix = converted_source(path)
    if prefix is not None:
        return CONVERTED_SOURCES[prefix].tokenizer(str(path))
    return load_plain_tokenizer(path, where)


def _from_plain_dual_encoder_folder(folder: Path, tokenizer: Any) -> DualEncoder:
    """A VisionTextDualEncoderModel saved by transformers: its towers keep their poolers (what it pools with),
    and transformers' own loader maps the legacy parameter names its save_pretrained writes (e.g. ViT's)."""
    try:
        hf, info = VisionTextDualEncoderModel.from_pretrained(str(folder), output_loading_info=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load VisionTextDualEncoderModel from {folder}: {e}") from None
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if missing:
        raise ModelLoadError(f"weights of {folder} do not fit its config: missing {sorted(missing)[:5]}")
    image_size = int(getattr(hf.config.vision_config, "image_size", 224))
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="pooler", **image_settings(folder, image_size))
    model = DualEncoder(hf.vision_model, hf.text_model, int(hf.config.projection_dim), meta, tokenizer)
    with torch.no_grad():
        model.visual_projection.weight.copy_(hf.visual_projection.weight)
        model.text_projection.weight.copy_(hf.text_projection.weight)
        model.logit_scale.copy_(hf.logit_scale)
    return model


def _from_dual_encoder_folder(folder: Path, cfg: dict[str, Any], tokenizer: Any) -> DualEncoder:
    mm = cfg.get("mmkd")
    if mm is None:  # a plain transformers VisionTextDualEncoderModel: its conventions
        return _from_plain_dual_encoder_folder(folder, tokenizer)
    vision_cfg = config_from_dict(cfg["vision_config"], f"{folder / 'config.json'} vision_config")
    text_cfg = config_from_dict(cfg["text_config"], f"{folder / 'config.json'} text_config")
    meta = EncoderMeta.from_json(mm)
    vision = drop_unused_pooler(model_from_config(vision_cfg), meta.vision_pooling)
    text = drop_unused_pooler(model_from_config(text_cfg), meta.text_pooling)
    model = DualEncoder(vision, text, int(cfg["projection_dim"]), meta, tokenizer)
    load_strict(model, read_state_dict(folder), str(folder))
    return model


def _clip_tower(cls: type[nn.Module], config: Any, part: nn.Module, inner: str) -> nn.Module:
    """CLIPModel's half as a standalone tower: transformers 5 keeps CLIPVisionModel/CLIPTextModel inside
    CLIPModel, 4.x kept only their inner transformer (the ``vision_model``/``text_model`` attribute)."""
    if isinstance(part, cls):
        return part
    tower = cls(config)
    getattr(tower, inner).load_state_dict(part.state_dict())
    return tower


def _from_clip_folder(folder: Path, cfg: dict[str, Any], tokenizer: Any) -> DualEncoder:
    try:
        clip = CLIPModel.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"cannot load CLIPModel from {folder}: {e}") from None
    return _from_clip_model(clip, image_settings(folder, int(clip.config.vision_config.image_size)), tokenizer)


def _from_clip_model(clip: CLIPModel, settings: dict[str, Any], tokenizer: Any) -> DualEncoder:
    """A CLIPModel (from a folder, or converted) as a DualEncoder; ``settings``: image size, mean and std."""
    vision = _clip_tower(CLIPVisionModel, clip.config.vision_config, clip.vision_model, "vision_model")
    text = _clip_tower(CLIPTextModel, clip.config.text_config, clip.text_model, "text_model")
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="pooler",
                       max_text_length=int(clip.config.text_config.max_position_embeddings), **settings)
    model = DualEncoder(vision, text, int(clip.config.projection_dim), meta, tokenizer)
    with torch.no_grad():
        model.visual_projection.weight.copy_(clip.visual_projection.weight)
        model.text_projection.weight.copy_(clip.text_projection.weight)
        model.logit_scale.copy_(clip.logit_scale)
    return model


def _from_shared_block_folder(folder: Path, cfg: dict[str, Any], tokenizer: Any) -> DualEncoder:
    from mmkd.models.shared_block import SharedBlockDualEncoder, shared_block_kwargs

    meta = EncoderMeta.from_json(cfg["mmkd"])
    kwargs = shared_block_kwargs(meta)
    if not kwargs:
        raise ModelLoadError(f"{folder}: a shared-block model without its mmkd.extra.shared_block settings")
    where = folder / "config.json"
    vision = drop_unused_pooler(model_from_config(config_from_dict(cfg["vision_config"], f"{where} vision_config")),
                                meta.vision_pooling)
    text = drop_unused_pooler(model_from_config(config_from_dict(cfg["text_config"], f"{where} text_config")),
                              meta.text_pooling)
    model = SharedBlockDualEncoder(vision, text, int(cfg["projection_dim"]), meta, tokenizer, **kwargs)
    load_strict(model, read_state_dict(folder), str(folder))
    return model


LOADERS = {
    "vision-text-dual-encoder": _from_dual_encoder_folder,
    "clip": _from_clip_folder,
    "mmkd-shared-block-dual-encoder": _from_shared_block_folder,
    "siglip": siglip.load_siglip,
    "siglip2": siglip.refuse_siglip2,
}


def _from_open_clip(spec: str, tokenizer_path: str | None) -> tuple[DualEncoder, Path]:
    ckpt = load_open_clip(spec, tokenizer_path)
    settings = {"image_size": int(ckpt.model.config.vision_config.image_size), "image_mean": ckpt.image_mean,
                "image_std": ckpt.image_std}
    return _from_clip_model(ckpt.model, settings, ckpt.tokenizer), parse_spec(spec)[0]


@dataclass(frozen=True)
class ConvertedSource:
    """A checkpoint format of another library: load(spec, tokenizer_path) -> (model, its folder); tokenizer(spec)."""

    load: Callable[[str, str | None], tuple[DualEncoder, Path]]
    tokenizer: Callable[[str], Any]


# Checkpoints in other libraries' formats, named ``PREFIX:SPEC`` wherever a dual encoder is accepted (teacher,
# student tower source, eval --model, cache --teacher) and converted on load.
CONVERTED_SOURCES: dict[str, ConvertedSource] = {
    "open_clip": ConvertedSource(_from_open_clip, open_clip_tokenizer),
}


def converted_source(path_or_id: str | os.PathLike) -> str | None:
    """The CONVERTED_SOURCES prefix ``path_or_id`` names, or None (a folder, package: model or hub id)."""
    text = str(path_or_id)
    return next((p for p in CONVERTED_SOURCES if text.startswith(p + ":")), None)


def load_dual_encoder(path_or_id: str | os.PathLike, tokenizer_path: str | None = None) -> DualEncoder:
    """Load a dual encoder from an mmkd folder, a CLIPModel, a SiglipModel or a VisionTextDualEncoderModel (folder
    or hub id), or convert one named ``PREFIX:SPEC`` (see CONVERTED_SOURCES)."""
    prefix = converted_source(path_or_id)
    if prefix is not None:
        model, folder = CONVERTED_SOURCES[prefix].load(str(path_or_id), tokenizer_path)
        check_finite(model, folder)
        return model.eval()
    folder = resolve(path_or_id)
    if (folder / EXPORT_FILE).is_file():
        raise ModelLoadError(f"{folder} is an ONNX export (mmkd export): `mmkd eval zeroshot|retrieval --model` "
                             "score it; anything else (training, distilling from it, bias, efficiency, eval all, "
                             "exporting again) needs the student folder it was exported from")
    cfg = read_config(folder)
    model_type = cfg.get("model_type")
    if model_type not in LOADERS:
        raise ModelLoadError(f"{folder}: model_type {model_type!r} is not a dual encoder mmkd can load; "
                             f"supported: {', '.join(LOADERS)}")
    weights_file(folder)  # fail on a weightless folder before anything slow
    tokenizer = load_tokenizer(tokenizer_path or folder, where=str(tokenizer_path or folder))
    model = LOADERS[model_type](folder, cfg, tokenizer)
    check_finite(model, folder)
    model.eval()
    return model


def check_finite(model: nn.Module, folder: Path) -> None:
    """Refuse weights holding NaN/inf (a diverged or damaged save): every output of such a model is garbage."""
    name = first_nonfinite(model)
    if name is not None:
        where = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), folder)
        raise ModelLoadError(f"{where}: tensor {name} holds non-finite values (NaN/inf); the model is damaged "
                             "or its training diverged, so it cannot be used")


def save_dual_encoder(model: DualEncoder, out: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors + tokenizer into ``out`` atomically (tmp folder, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.saved_state().items()}  # a GPU student
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.hf_config(), indent=2, allow_nan=False))
        model.save_extras(str(tmp))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
    except BaseException as e:  # nothing half-written stays: the temp folder goes, an earlier save is untouched
        full = not isinstance(e, KeyboardInterrupt) and is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full_error(out, "an earlier save there is untouched") from None
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out
