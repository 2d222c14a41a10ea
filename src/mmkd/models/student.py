"""Building a student from a config: shrink the teacher's towers (weight inheritance) or build new ones."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, CLIPModel

from mmkd.config import StudentConfig, TowerSpec
from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
from mmkd.models.hub import drop_unused_pooler, load_tokenizer, resolve
from mmkd.models.towers import ARCHS, build_tower, default_pooling, shrink_tower, tower_width


def _pretrained_tower(source: str, modality: str) -> nn.Module:
    folder = resolve(source)
    try:
        model = AutoModel.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"cannot load a {modality} tower from {source}: {e}") from None
    if isinstance(model, CLIPModel):  # a whole CLIP given as a tower source: take the matching half
        from mmkd.models.hub import load_dual_encoder

        de = load_dual_encoder(folder)
        return de.vision_model if modality == "image" else de.text_model
    return model


@dataclass
class TeacherInfo:
    """What a student needs of a teacher that is not loaded (a cached teacher): its settings, not its weights."""

    meta: EncoderMeta
    projection_dim: int
    logit_scale: float  # exp'd, as the model reports it
    tokenizer: Any = None
    source: str = "the cached teacher"


def make_tower(spec: TowerSpec, teacher_tower: nn.Module | None, modality: str, vocab_size: int | None,
               teacher_source: str = "the teacher") -> tuple[nn.Module, str | None]:
    """The tower and, for pretrained text towers, the folder its tokenizer comes from."""
    if spec.source == "teacher":
        if teacher_tower is None:
            key = "vision" if modality == "image" else "text"
            raise ValueError(f"student.{key}.source: 'teacher' shrinks the teacher's {modality} tower and needs "
                             f"its weights, which {teacher_source} does not load; use source: new (with arch and "
                             "config) or a folder/hub id of a pretrained tower")
        return shrink_tower(teacher_tower, spec.keep_layers), None
    if spec.source == "new":
        if spec.arch is None:
            raise ValueError(f"student.{'vision' if modality == 'image' else 'text'}.arch is required with "
                             f"source: new; valid: {', '.join(ARCHS.names())}")
        _, arch_modality = ARCHS.get(spec.arch)
        if arch_modality != modality:
            raise ValueError(f"architecture {spec.arch!r} is a {arch_modality} tower, not a {modality} tower")
        kwargs = dict(spec.config)
        if modality == "text" and vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        return build_tower(spec.arch, kwargs), None
    return _pretrained_tower(spec.source, modality), spec.source


def build_student(teacher: DualEncoder | TeacherInfo, cfg: StudentConfig) -> DualEncoder:
    """A student dual encoder shaped by ``cfg``, initialised from the teacher where asked.

    With a ``TeacherInfo`` (no weights) only new or pretrained towers can be built, and projections start fresh.
    """
    loaded = isinstance(teacher, DualEncoder)
    tok = teacher.tokenizer
    vocab = len(tok) if tok is not None else None
    where = "the teacher" if loaded else teacher.source
    vision, _ = make_tower(cfg.vision, teacher.vision_model if loaded else None, "image", None, where)
    text, tok_source = make_tower(cfg.text, teacher.text_model if loaded else None, "text", vocab, where)
    if tok_source is not None:
        tok = load_tokenizer(tok_source)
    meta = copy.deepcopy(teacher.meta)
    meta.vision_pooling = cfg.vision.pooling or (
        teacher.meta.vision_pooling if cfg.vision.source == "teacher" else default_pooling(vision, "image"))
    meta.text_pooling = cfg.text.pooling or (
        teacher.meta.text_pooling if cfg.text.source == "teacher" else default_pooling(text, "text"))
    if hasattr(vision.config, "image_size") and cfg.vision.source != "teacher":
        meta.image_size = int(vision.config.image_size)
    drop_unused_pooler(vision, meta.vision_pooling)
    drop_unused_pooler(text, meta.text_pooling)
    dim = cfg.projection_dim or teacher.projection_dim
    scale = float(teacher.logit_scale.detach()) if loaded else math.log(teacher.logit_scale)
    student = DualEncoder(vision, text, dim, meta, tok, logit_scale_init=scale)
    if loaded and cfg.init_projections_from_teacher and dim == teacher.projection_dim:
        with torch.no_grad():
            for name in ("visual_projection", "text_projection"):
                s, t = getattr(student, name), getattr(teacher, name)
                if s.weight.shape == t.weight.shape:
                    s.weight.copy_(t.weight)
    apply_freeze(student, cfg.freeze)
    return student


def apply_freeze(model: nn.Module, prefixes: list[str]) -> None:
    """Freeze parameters by dotted-name prefix; a prefix matching nothing is a config error, not a silent no-op.

    Prefixes match whole name components: ``vision_model.encoder.layers.1`` freezes layer 1, not 10 and 11.
    """
    names = [n for n, _ in model.named_parameters()]

    def matches(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in prefixes:
        if not any(matches(n, prefix) for n in names):
            raise ValueError(f"student.freeze: {prefix!r} matches no parameter; parameters start with "
                             f"{sorted({n.split('.')[0] for n in names})}")
    for n, p in model.named_parameters():
        if any(matches(n, pre) for pre in prefixes):
            p.requires_grad_(False)


def tower_widths(model: DualEncoder) -> dict[str, int]:
    return {"image": tower_width(model.vision_model), "text": tower_width(model.text_model)}
