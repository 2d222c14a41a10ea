"""The objective interface and registry.

An objective maps the student's outputs and the teacher's targets to named loss terms. Objectives are
nn.Modules so that any learnable parts (projections between student and teacher widths) live in the
optimizer, in DDP and in the checkpoint with the student, a thing CLIP-KD's code got wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmkd.errors import ConfigError
from mmkd.objectives.ensemble import PerTeacher, member_targets
from mmkd.registry import Registry
from mmkd.seeding import seeded

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@dataclass
class ObjectiveContext:
    """Widths an objective may need to size learnable projections."""

    student_embed_dim: int
    teacher_embed_dim: int | None = None
    student_feature_dims: dict[str, int] = field(default_factory=dict)  # tower → pre-projection width
    teacher_feature_dims: dict[str, int] = field(default_factory=dict)
    # a SigLIP teacher's similarity, ``scale * cos + bias`` (scale exp'd, not capped); None for other teachers
    teacher_logit_scale: float | None = None
    teacher_logit_bias: float | None = None
    student_logit_bias: bool = False  # the student is a SigLIP model: it carries its own learnt scale and bias


class Objective(nn.Module):
    """Base class: ``forward(student, teacher) -> {term_name: scalar}``, unweighted.

    student holds ``image_embeds`` (normalised, paired images first, then unpaired ones), ``text_embeds``
    (one per paired image), ``image_features``/``text_features`` (pre-projection), ``logit_scale``,
    and ``n_paired`` (no model: a loss that is a function of these outputs is exact under accumulation and
    tolerates any freeze under torchrun; one that must run the student declares ``exact_accumulation = False``);
    teacher holds the same embedding/feature keys for the teacher (empty when training without
    one), plus its ``logit_scale`` where it has one. Parameters are keyword-only ``__init__`` arguments.
    """

    uses_teacher: bool = True
    # takes every teacher of an ensemble at once: forward's ``teacher`` is then a list of per-teacher target
    # dicts (one element for a single teacher); otherwise an ensemble builds one instance per teacher (PerTeacher)
    handles_ensembles: bool = False
    teacher_features: bool = False  # needs the teacher's pooled pre-projection features, not only embeddings
    default_towers: tuple[str, ...] = ("image", "text")  # the towers a spec that names none applies to
    # which terms read the captions, for the synthetic-caption pass (MobileCLIP repeats only what reads them):
    # "all" for batch-relational objectives (every term compares images with captions), "text" for per-tower ones
    # (only the text tower's terms)
    caption_terms: str = "all"
    # exact under train.accumulate: the loss is a function of the student's per-sample outputs (features) and the
    # targets only, so it can be computed once on the whole k·b batch; an objective that runs the student itself
    # (or keeps state across calls) declares False and is refused with accumulation
    exact_accumulation: bool = True
    # the fraction of image patches the student's (one) image forward drops while training (CLIP-KD's MFD): every
    # objective then reads that masked forward; None: unmasked
    image_mask_ratio: float | None = None

    def __init__(self, ctx: ObjectiveContext, towers: list[str], **params: Any) -> None:
        super().__init__()
        self.towers = list(towers)

    def forward(self, student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def caption_towers(obj: nn.Module) -> list[str]:
    """The towers whose terms read captions (see ``Objective.caption_terms``)."""
    towers = list(getattr(obj, "towers", []))
    return towers if getattr(obj, "caption_terms", "all") == "all" else [t for t in towers if t == "text"]


@contextmanager
def only_towers(obj: nn.Module, towers: list[str]) -> Iterator[None]:
    """``obj`` (or every teacher's instance of it) computes the terms of ``towers`` only, for the duration."""
    objs = list(obj.members) if isinstance(obj, PerTeacher) else [obj]
    saved = [o.towers for o in objs]
    for o in objs:
        o.towers = list(towers)
    try:
        yield
    finally:
        for o, t in zip(objs, saved):
            o.towers = t


def objective_params(cls: type[Objective]) -> dict[str, Any]:
    """The tunable parameters of an objective and their defaults (for listing and for validation)."""
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items()
            if n not in ("self", "ctx", "towers", "params") and p.kind is p.KEYWORD_ONLY}


class WeightedSum(nn.Module):
    """The weighted sum of several objectives; returns the total (``loss``) and every unweighted term for logging."""

    def __init__(self, items: list[tuple[str, float, Objective | PerTeacher]]) -> None:
        super().__init__()
        self.names = [n for n, _, _ in items]
        self.weights = [w for _, w, _ in items]
        self.objectives = nn.ModuleList([o for _, _, o in items])

    @property
    def needs_teacher(self) -> bool:
        return any(o.uses_teacher for o in self.objectives)

    def image_mask_ratio(self) -> float | None:
        """The mask ratio the objectives declare for the student's image forward (one at most, else refused)."""
        ratios = {float(r) for o in self.objectives if (r := getattr(o, "image_mask_ratio", None)) is not None}
        if len(ratios) > 1:
            raise ConfigError(f"objectives: several image mask ratios {sorted(ratios)} declared, but the student "
                              "runs one (masked) image forward that every objective reads; give them one mask_ratio")
        return ratios.pop() if ratios else None

    def inexact_under_accumulation(self) -> list[str]:
        """The names of the objectives that cannot be computed exactly on an accumulated batch."""
        return [n for n, o in zip(self.names, self.objectives) if not getattr(o, "exact_accumulation", True)]

    def forward(self, student: dict[str, Any], teacher: dict[str, Any], captions_only: bool = False
                ) -> dict[str, torch.Tensor]:
        """teacher: one teacher's targets, or an ensemble's (``{"members": [...]}``, `member_targets`).

        captions_only: only the terms that read captions (`caption_towers`), for the synthetic-caption pass; an
        objective without any is skipped, so image-only terms count once.
        """
        terms: dict[str, torch.Tensor] = {}
        total = None
        members = member_targets(teacher)
        for name, weight, obj in zip(self.names, self.weights, self.objectives):
            if captions_only:
                towers = caption_towers(obj)
                if not towers:
                    continue
                with only_towers(obj, towers):
                    out = self._one(name, obj, student, members, terms)
            else:
                out = self._one(name, obj, student, members, terms)
            for term, value in out.items():
                key = term if term.startswith(name) else f"{name}/{term}"
                terms[key] = value.detach()
                total = weight * value if total is None else total + weight * value
        if total is None:  # a synthetic pass where nothing reads captions
            total = torch.zeros((), device=student["image_features"].device)
        terms["loss"] = total
        return terms

    @staticmethod
    def _one(name: str, obj: nn.Module, student: dict[str, Any], members: list[dict[str, Any]],
             terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(obj, PerTeacher):
            out, per = obj(student, members)
            for i, own in enumerate(per):  # logged, not added: the mean is the loss
                terms.update({f"{name}/teacher{i}/{term}": v.detach() for term, v in own.items()})
            return out
        if getattr(obj, "handles_ensembles", False):
            return obj(student, members)
        return obj(student, members[0])  # task objectives (and single teachers) read the first teacher's targets


def check_specs(specs: list[Any]) -> None:
    """Refuse unknown objective names and parameters before any model is loaded (the config layer cannot see
    the registry: it sits below the objectives)."""
    for i, spec in enumerate(specs):
        if spec.name not in OBJECTIVES:
            raise ConfigError(f"objectives[{i}].name: unknown objective {spec.name!r}; "
                              f"valid: {', '.join(OBJECTIVES.names())}")
        valid = objective_params(OBJECTIVES.get(spec.name))
        unknown = sorted(set(spec.params) - set(valid))
        if unknown:
            raise ConfigError(f"objectives[{i}] ({spec.name}): unknown parameter(s) {unknown}; "
                              f"valid: {', '.join(f'{k}={v!r}' for k, v in valid.items()) or 'none'}")


def build_objectives(specs: list[Any], ctx: ObjectiveContext | list[ObjectiveContext], *, seed: int | None = None
                     ) -> WeightedSum:
    """Build the weighted sum from config specs; bad names/params fail listing the valid ones.

    ctx: the teacher's context, or one per teacher of an ensemble (a teacher-using objective without
    ``handles_ensembles`` is then built once per teacher, see `PerTeacher`). seed: the learnable maps'
    initialisation is a function of it (None: torch's global generator as it stands).
    """
    check_specs(specs)
    with seeded(seed, "objectives"):
        return _build_objectives(specs, ctx if isinstance(ctx, list) else [ctx])


def _build_objectives(specs: list[Any], ctxs: list[ObjectiveContext]) -> WeightedSum:
    items = []
    for i, spec in enumerate(specs):
        cls = OBJECTIVES.get(spec.name)
        valid = objective_params(cls)
        try:
            towers = list(cls.default_towers) if spec.towers is None else list(spec.towers)
            obj: nn.Module = cls(ctxs[0], towers, **spec.params)
            if len(ctxs) > 1 and obj.uses_teacher and not cls.handles_ensembles:
                obj = PerTeacher([obj, *(cls(c, towers, **spec.params) for c in ctxs[1:])])
        except (TypeError, ValueError) as e:  # a bad value: say which objective, and what it takes
            raise ConfigError(f"objectives[{i}] ({spec.name}): {e}; parameters (defaults): "
                             f"{', '.join(f'{k}={v!r}' for k, v in valid.items()) or 'none'}") from None
        items.append((spec.name, float(spec.weight), obj))
    return WeightedSum(items)
