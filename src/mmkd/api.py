"""The Python API: what a notebook needs, without deep imports (``import mmkd``).

Each function is a thin door onto the same code the CLI runs, so a notebook and ``mmkd distill`` give the same
results. Imports of torch and transformers happen inside the functions: ``import mmkd`` stays instant and has no
side effects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


def load(path_or_id: PathLike, **kwargs: Any) -> Any:
    """A dual encoder from an mmkd folder, a ``CLIPModel`` or ``VisionTextDualEncoderModel`` (folder, hub id or
    ``package:NAME``). The result answers ``encode_image``, ``encode_text`` and ``tokenize``."""
    from mmkd.models.hub import load_dual_encoder

    return load_dual_encoder(path_or_id, **kwargs)


def create_student(teacher: Any, student: Any = "half-depth", *, seed: int | None = 0) -> Any:
    """A student for ``teacher`` (a loaded dual encoder, or a path/hub id to load one).

    student: a preset name (``half-depth``, ``half-depth-locked-text``; see ``mmkd.config.student_presets``), a
    mapping of ``student:`` config keys (``{"preset": "half-depth", "projection_dim": 256}``) or a StudentConfig.
    seed: its fresh weights are a function of it (None: torch's global generator as it stands).
    """
    from mmkd.config import student_config
    from mmkd.models.student import build_student

    if isinstance(teacher, (str, os.PathLike)):
        teacher = load(teacher)
    return build_student(teacher, student_config(student), seed=seed)


def distill(config: PathLike | dict[str, Any] | Any, overrides: list[str] | None = None, *,
            resume: bool | str = False, overwrite: bool = False, log: Any = print) -> dict[str, Any]:
    """One distillation run, as ``mmkd distill`` runs it; returns the run's metrics (also in OUT/metrics.json).

    config: a YAML file, a dict of the same keys, or a RunConfig; overrides: ``key=value`` strings.
    resume / overwrite: as ``--resume`` (True, or "auto" for ``--resume-or-start``) and ``--overwrite``.
    """
    from mmkd.config import RunConfig, config_from_dict, load_config
    from mmkd.pipeline import run_distill

    if isinstance(config, RunConfig):
        if overrides:
            raise TypeError("overrides apply to a YAML file or a dict; edit the RunConfig's fields instead")
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config, overrides)
    else:
        cfg = load_config(Path(config), overrides)
    return run_distill(cfg, resume=resume, overwrite=overwrite, log=log)


def evaluate(model: Any, specs: Any, *, cache_dir: PathLike = "runs/.cache", log: Any = print) -> dict[str, Any]:
    """Evaluate one model (loaded, or a path/hub id) as a run's ``eval:`` section does; returns name -> metrics.

    specs: one or a list of evaluation specs, as dicts of ``eval:`` keys (``{"kind": "zeroshot", "data":
    "cifar10:DIR", "limit": 1000}``) or EvalSpecs; kinds: zeroshot, retrieval, bias, efficiency.
    """
    from mmkd.config import EvalSpec, from_dict
    from mmkd.eval.tasks import evaluate as run_specs

    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    items = specs if isinstance(specs, list) else [specs]
    parsed = [s if isinstance(s, EvalSpec) else from_dict(EvalSpec, s, f"eval[{i}]") for i, s in enumerate(items)]
    return run_specs(model, parsed, cache_dir=cache_dir, log=log)


def list_objectives() -> dict[str, dict[str, Any]]:
    """Every registered objective: its tunable parameters with defaults, and whether it needs a teacher."""
    from mmkd.objectives import OBJECTIVES
    from mmkd.objectives.base import objective_params

    return {name: {"params": objective_params(OBJECTIVES.get(name)),
                   "uses_teacher": OBJECTIVES.get(name).uses_teacher} for name in OBJECTIVES.names()}
