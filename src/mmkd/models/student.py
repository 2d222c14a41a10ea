"""Building a student from a config: shrink the teacher's towers (weight inheritance) or build new ones."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, CLIPModel, SiglipModel, SiglipTextModel, SiglipVisionModel

from mmkd.config import StudentConfig, TowerSpec
from mmkd.errors import ConfigError
from mmkd.models.dual_encoder import DualEncoder, EncoderMeta, SiglipDualEncoder
from mmkd.models.hf_vision import hf_vision_types, is_hf_arch
from mmkd.models.hub import (
    LOADERS,
    converted_source,
    drop_unused_pooler,
    load_dual_encoder,
    load_tokenizer,
    read_config,
    resolve,
)
from mmkd.models.towers import (
    ARCHS,
    arch_modality,
    build_tower,
    check_text_pooling,
    clip_text_ids,
    default_pooling,
    shrink_tower,
    tower_width,
)
from mmkd.seeding import seeded


def _pretrained_tower(source: str, modality: str) -> nn.Module:
    if converted_source(source) is not None:  # e.g. open_clip:FOLDER: a whole dual encoder, converted
        de = load_dual_encoder(source)
        return de.vision_model if modality == "image" else de.text_model
    folder = resolve(source)
    if (folder / "config.json").is_file() and read_config(folder).get("model_type") in LOADERS:
        de = load_dual_encoder(folder)  # a whole dual encoder (mmkd's, CLIP, SigLIP): the matching half
        return de.vision_model if modality == "image" else de.text_model
    try:
        model = AutoModel.from_pretrained(str(folder))
    except Exception as e:
        raise ConfigError(f"cannot load a {modality} tower from {source}: {e}") from None
    if isinstance(model, (CLIPModel, SiglipModel)):  # a whole model given as a tower source: the matching half
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
               missing: str = "the teacher has no such tower", tokenizer: Any = None) -> tuple[nn.Module, str | None]:
    """The tower and, for pretrained text towers, the folder its tokenizer comes from.

    missing: why there is no teacher tower to shrink (for the error), e.g. "there is no teacher". tokenizer: a new
    text tower's; a new ``clip_text`` tower takes its special ids from it where its config does not set them.
    """
    if spec.source == "teacher":
        if teacher_tower is None:
            key = "vision" if modality == "image" else "text"
            raise ConfigError(f"student.{key}.source: 'teacher' shrinks the teacher's {modality} tower and needs "
                             f"its weights, but {missing}; use source: new (with arch and config) or a "
                             "folder/hub id of a pretrained tower")
        tower = shrink_tower(teacher_tower, spec.keep_layers)
        # what the student trains is decided by its own student.freeze, never by the teacher's frozen flags
        # (an in-memory teacher with a frozen text tower would otherwise hand on a frozen copy)
        tower.requires_grad_(True)
        return tower, None
    if spec.source == "new":
        if spec.arch is None:
            raise ConfigError(f"student.{'vision' if modality == 'image' else 'text'}.arch is required with "
                             f"source: new; valid: {', '.join(ARCHS.names())}, or hf:<model_type> (any transformers "
                             "vision model, e.g. hf:convnext)")
        if not is_hf_arch(spec.arch) and spec.arch not in ARCHS:  # ARCHS.get's KeyError would be an internal error
            key = "vision" if modality == "image" else "text"
            hint = f" (did you mean 'hf:{spec.arch}'?)" if spec.arch in hf_vision_types() else ""
            raise ConfigError(f"student.{key}.arch {spec.arch!r} is unknown{hint}; valid: {', '.join(ARCHS.names())}, "
                              "or hf:<model_type> for an image tower (any transformers vision model)")
        kind = arch_modality(spec.arch)
        if kind != modality:
            raise ConfigError(f"architecture {spec.arch!r} is a {kind} tower, not a {modality} tower")
        kwargs = dict(spec.config)
        if modality == "text" and vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        if spec.arch == "clip_text" and tokenizer is not None:
            kwargs = {**clip_text_ids(tokenizer), **kwargs}
        return build_tower(spec.arch, kwargs), None
    tower = _pretrained_tower(spec.source, modality)
    if spec.keep_layers is not None:  # a pretrained tower, shrunk: what source: teacher does without a teacher
        tower = shrink_tower(tower, spec.keep_layers)
    return tower, spec.source


def _tokenizer(cfg: StudentConfig, teacher: Any, tok_source: str | None) -> Any:
    """The student's tokenizer: the configured one, else the pretrained text tower's, else the teacher's."""
    source = cfg.tokenizer or tok_source
    if source is not None:
        return load_tokenizer(source if converted_source(source) else resolve(source), where=source)
    tok = getattr(teacher, "tokenizer", None)
    if tok is None:
        raise ConfigError("the student needs a tokenizer: set student.tokenizer (a folder or hub id with tokenizer "
                         "files, e.g. sentence-transformers/all-MiniLM-L6-v2), or use a pretrained text tower")
    return tok


def _missing(teacher: Any, modality: str) -> str:
    """Why the teacher has no ``modality`` tower to shrink, for the error message."""
    if teacher is None:
        return "there is no teacher (teacher is empty)"
    if isinstance(teacher, TeacherInfo):
        return f"{teacher.source} does not load the teacher's weights"
    return f"the teacher has no {modality} tower (an image-only teacher)"


def build_student(teacher: Any, cfg: StudentConfig, *, seed: int | None = None) -> DualEncoder:
    """A student dual encoder shaped by ``cfg``, initialised from the teacher where asked.

    teacher: a DualEncoder; an image-only teacher (vision_model + meta); a ``TeacherInfo`` (a cached teacher: its
    settings, no weights, so only new or pretrained towers and fresh projections); or None (training from scratch).
    seed: every random initialisation (new towers, projections, weights a pretrained checkpoint lacks) is a
    function of it, so a run is a function of its config; None uses torch's global generator as it stands.
    """
    with seeded(seed, "student"):
        return _build_student(teacher, cfg, seed)


def _build_student(teacher: Any, cfg: StudentConfig, seed: int | None) -> DualEncoder:
    t_vision = getattr(teacher, "vision_model", None)
    t_text = getattr(teacher, "text_model", None)
    # a new text tower needs the vocabulary size first; a pretrained one brings its own tokenizer
    tok = _tokenizer(cfg, teacher, None) if cfg.tokenizer or cfg.text.source in ("teacher", "new") else None
    vocab = len(tok) if tok is not None else None
    vision, _ = make_tower(cfg.vision, t_vision, "image", None, _missing(teacher, "image"))
    text, tok_source = make_tower(cfg.text, t_text, "text", vocab, _missing(teacher, "text"), tok)
    if tok is None:
        tok = _tokenizer(cfg, teacher, tok_source)
    meta = copy.deepcopy(teacher.meta) if teacher is not None else EncoderMeta()
    meta.extra = {}
    meta.vision_pooling = cfg.vision.pooling or (
        teacher.meta.vision_pooling if cfg.vision.source == "teacher" else default_pooling(vision, "image"))
    meta.text_pooling = cfg.text.pooling or (
        teacher.meta.text_pooling if cfg.text.source == "teacher" and t_text is not None
        else default_pooling(text, "text"))
    if hasattr(vision.config, "image_size") and cfg.vision.source != "teacher":
        meta.image_size = int(vision.config.image_size)
    if not isinstance(text, SiglipTextModel):  # only SigLIP's text head needs every caption at the full length
        meta.text_padding = "longest"
    check_text_pooling(text, tok, meta.text_pooling, "student.text")
    drop_unused_pooler(vision, meta.vision_pooling)
    drop_unused_pooler(text, meta.text_pooling)
    t_dim = getattr(teacher, "projection_dim", None)
    t_scale = getattr(teacher, "logit_scale", None)
    if isinstance(t_scale, torch.Tensor):  # a loaded teacher's parameter (log scale)
        scale_init = float(t_scale.detach())
    elif isinstance(t_scale, float):  # a TeacherInfo's, exp'd as the model reports it
        scale_init = math.log(t_scale)
    else:
        scale_init = math.log(1 / 0.07)
    # the heads draw from their own stream: the same fresh projections whether the towers were copied from a
    # loaded teacher or read from its folder (which draws a random init before loading), e.g. the demo's online
    # and cached students
    with seeded(seed, "student/heads"):
        if cfg.shared is not None:
            return _shared_student(teacher, cfg, vision, text, meta, tok, scale_init)
        if _siglip_shaped(vision, text, meta, cfg):
            return _siglip_student(teacher, cfg, vision, text, meta, tok, scale_init)
        dim = cfg.projection_dim or t_dim
        if dim is None:
            raise ConfigError("student.projection_dim is required when the teacher has no embedding width "
                              "(no teacher, or an image-only one)")
        student = DualEncoder(vision, text, dim, meta, tok, logit_scale_init=scale_init)
    if isinstance(teacher, DualEncoder) and cfg.init_projections_from_teacher and dim == t_dim:
        with torch.no_grad():
            for name in ("visual_projection", "text_projection"):
                s, t = getattr(student, name), getattr(teacher, name)
                if s.weight.shape == t.weight.shape:
                    s.weight.copy_(t.weight)
    apply_freeze(student, cfg.freeze)
    return student


def _siglip_shaped(vision: nn.Module, text: nn.Module, meta: EncoderMeta, cfg: StudentConfig) -> bool:
    """Both towers SigLIP's, pooled by their heads, no other embedding width asked: a SigLIP student (saved as a
    SiglipModel). Anything else over SigLIP towers is a plain dual encoder with projections."""
    if not (isinstance(vision, SiglipVisionModel) and isinstance(text, SiglipTextModel)):
        return False
    width = tower_width(vision)
    return (meta.vision_pooling == meta.text_pooling == "pooler" and width == tower_width(text)
            and cfg.projection_dim in (None, width))


def _siglip_student(teacher: Any, cfg: StudentConfig, vision: nn.Module, text: nn.Module, meta: EncoderMeta,
                    tok: Any, scale_init: float) -> DualEncoder:
    """A SigLIP student: scale and bias inherited from a SigLIP teacher, else SigLIP's init (10, -10)."""
    bias = getattr(teacher, "logit_bias", None)
    if isinstance(teacher, SiglipDualEncoder) and isinstance(bias, torch.Tensor):
        scale, bias_init = scale_init, float(bias.detach())
    else:
        scale, bias_init = math.log(10.0), -10.0
    student = SiglipDualEncoder(vision, text, meta, tok, logit_scale_init=scale, logit_bias_init=bias_init)
    apply_freeze(student, cfg.freeze)
    return student


def _shared_student(teacher: Any, cfg: StudentConfig, vision: nn.Module, text: nn.Module, meta: EncoderMeta,
                    tok: Any, scale_init: float) -> DualEncoder:
    """The unimodal-teacher student: the towers feed one shared block, as wide as the teacher's CLS by default."""
    from mmkd.models.shared_block import SharedBlockDualEncoder

    sh = cfg.shared
    assert sh is not None
    t_vision = getattr(teacher, "vision_model", None)
    width = sh.width or (tower_width(t_vision) if t_vision is not None else None)
    if width is None:
        raise ConfigError("student.shared.width is required without a loaded teacher (none, or a cached one)")
    meta.vision_pooling = "cls"  # the shared block pools its own tokens; the tower's pooler is not used
    post = getattr(vision, "post_layernorm", None)
    if isinstance(post, nn.Module):  # CLIP's pooler norm would get no gradient (and trip DDP): freeze it
        for p in post.parameters():
            p.requires_grad_(False)
    student = SharedBlockDualEncoder(vision, text, cfg.projection_dim or width, meta, tok, scale_init,
                                     width=width, layers=sh.layers, heads=sh.heads, mlp_ratio=sh.mlp_ratio)
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
            raise ConfigError(f"student.freeze: {prefix!r} matches no parameter; parameters start with "
                             f"{sorted({n.split('.')[0] for n in names})}")
    for n, p in model.named_parameters():
        if any(matches(n, pre) for pre in prefixes):
            p.requires_grad_(False)


def feature_widths(model: DualEncoder) -> dict[str, int]:
    """Widths of the pooled pre-projection features each tower hands its projection (a shared block's width)."""
    return {"image": model.visual_projection.in_features, "text": model.text_projection.in_features}
