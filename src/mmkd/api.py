"""The Python API: what a notebook needs, without deep imports (``import mmkd``).

Each function is a thin door onto the same code the CLI runs, so a notebook and ``mmkd distill`` give the same
results. Imports of torch and transformers happen inside the functions: ``import mmkd`` stays instant and has no
side effects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

from mmkd.plugins import ObjectiveInfo, list_objectives

if TYPE_CHECKING:
    from mmkd.config import EvalSpec, RunConfig, StudentConfig
    from mmkd.models.dual_encoder import DualEncoder

PathLike = str | os.PathLike
Log = Callable[[str], None]
# one evaluation's scores by name (zeroshot: top1, top5, mean_per_class_recall; retrieval: i2t_r1, ...; bias and
# efficiency: nested tables), keyed as a run's ``eval:`` names them (``zeroshot:world:test:shape``)
EvalResults = dict[str, dict[str, object]]


class TrainSummary(TypedDict):
    steps: int
    seconds: float
    final_loss: float | None  # None: no step ran in this call (a resumed run that had finished)
    resumed_from: int | None


class DataSummary(TypedDict):
    on_error: str
    skipped: int  # bad samples left out (data.on_error: skip)


class _RunMetricsRequired(TypedDict):
    train: TrainSummary
    data: DataSummary


class RunMetrics(_RunMetricsRequired, total=False):
    """A run's ``metrics.json``: what ``distill`` returns."""

    eval: EvalResults
    eval_overlap: dict[str, object]  # eval sets that share samples with the training data
    run: dict[str, object]  # run_id, config_sha256, fingerprints


__all__ = ["EvalResults", "ObjectiveInfo", "RunMetrics", "create_student", "distill", "evaluate", "list_objectives",
           "load"]


def load(path_or_id: PathLike, tokenizer_path: str | None = None) -> DualEncoder:
    """A dual encoder from an mmkd folder, a ``CLIPModel`` or ``VisionTextDualEncoderModel`` (folder, hub id or
    ``package:NAME``). The result answers ``encode_image``, ``encode_text`` and ``tokenize``."""
    from mmkd.models.hub import load_dual_encoder

    return load_dual_encoder(path_or_id, tokenizer_path)


def create_student(teacher: DualEncoder | PathLike, student: str | Mapping[str, object] | StudentConfig = "half-depth",
                   *, seed: int | None = 0) -> DualEncoder:
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


def distill(config: PathLike | Mapping[str, object] | RunConfig, overrides: list[str] | None = None, *,
            resume: bool | str = False, overwrite: bool = False, log: Log = print) -> RunMetrics:
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
    elif isinstance(config, Mapping):
        cfg = config_from_dict(dict(config), overrides)
    else:
        cfg = load_config(Path(config), overrides)
    return cast(RunMetrics, run_distill(cfg, resume=resume, overwrite=overwrite, log=log))


def evaluate(model: DualEncoder | PathLike, specs: Mapping[str, object] | EvalSpec
             | Sequence[Mapping[str, object] | EvalSpec], *, cache_dir: PathLike = "runs/.cache",
             log: Log = print) -> EvalResults:
    """Evaluate one model (loaded, or a path/hub id) as a run's ``eval:`` section does; returns name -> metrics.

    specs: one or a list of evaluation specs, as dicts of ``eval:`` keys (``{"kind": "zeroshot", "data":
    "cifar10:DIR", "limit": 1000}``) or EvalSpecs; kinds: zeroshot, retrieval, bias, efficiency.
    """
    from mmkd.config import EvalSpec
    from mmkd.config_io import from_dict
    from mmkd.eval.tasks import evaluate as run_specs

    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    items = list(specs) if isinstance(specs, Sequence) else [specs]
    parsed = [s if isinstance(s, EvalSpec) else from_dict(EvalSpec, dict(s), f"eval[{i}]") for i, s in enumerate(items)]
    return cast(EvalResults, run_specs(model, parsed, cache_dir=cache_dir, log=log))
