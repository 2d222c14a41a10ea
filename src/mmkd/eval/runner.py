"""``mmkd eval all``: a suite of evaluations (a YAML file) run over a teacher and students into metrics.json.

A suite lists tasks (``EvalSpec``s, run by the one dispatch of ``mmkd.eval.tasks``). Per-model results land
in the model blocks of metrics.json (``zeroshot`` and ``retrieval`` keyed by the task's name, efficiency keys
at the top of the block); the bias probe compares models, so it is a top-level ``bias`` block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmkd.config import EvalSpec
from mmkd.config_io import from_dict, read_yaml
from mmkd.data import sources
from mmkd.data.paths import check_spec_paths, rebase_path, rebase_spec
from mmkd.errors import ConfigError, UsageError
from mmkd.eval.tasks import EVALS, WORLD_N, EvalContext, check_kind, data_format, run_spec
from mmkd.fileio import atomic_write_json


@dataclass
class SuiteConfig:
    name: str = "suite"
    cache_dir: str = "runs/.cache"  # built-in world images
    world_n: int = WORLD_N  # images in a built-in world split
    tasks: list[EvalSpec] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ suite handling


def _default_name(task: EvalSpec) -> str:
    if task.kind == "zeroshot" and task.data and data_format(task.data) == "world":
        return task.class_set or "colour_shape"
    return data_format(task.data) if task.data else task.kind


def _one_per_suite(task: EvalSpec) -> bool:
    """Efficiency fills the model blocks' top level and bias is one top-level block: one of each per suite;
    zeroshot and retrieval are keyed by their names, so a suite may have several."""
    return not EVALS.get(task.kind).named


def validate_suite(suite: SuiteConfig, where: str = "suite") -> SuiteConfig:
    """Kinds known, required data present, names unique per kind; errors name the task (``tasks[i]``)."""
    if not suite.tasks:
        raise ConfigError(f"{where}: 'tasks' is empty; list at least one, e.g. {{kind: zeroshot, data: world:test}}")
    seen: dict[tuple[str, str], int] = {}
    for i, task in enumerate(suite.tasks):
        at = f"{where}: tasks[{i}]"
        check_kind(task, at)
        if EVALS.get(task.kind).needs_data and not task.data:
            raise ConfigError(f"{at}: kind {task.kind} needs 'data' (a FORMAT:PATH spec)")
        if task.data:
            try:
                if data_format(task.data) != "world":
                    sources.parse_spec(task.data)
            except ValueError as e:
                raise ConfigError(f"{at}.data: {e}") from None
        if task.limit is not None and task.limit < 1:
            raise ConfigError(f"{at}.limit must be >= 1")
        if task.kind == "efficiency" and (not task.batch_sizes or min(task.batch_sizes) < 1):
            raise ConfigError(f"{at}.batch_sizes must be positive integers")
        task.name = task.name or _default_name(task)
        key = (task.kind, task.name if not _one_per_suite(task) else "")
        if key in seen:
            raise ConfigError(f"{at}: only one {task.kind} task per suite" if not key[1] else
                              f"{at}: tasks[{seen[key]}] is also a {task.kind} task named {task.name!r}; "
                              "give one a distinct 'name'")
        seen[key] = i
    return suite


def load_suite(path: str | Path, limit: int | None = None) -> SuiteConfig:
    """Read and validate a suite YAML; ``limit`` caps every data task (quick tries)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"suite file {p} not found")
    data = read_yaml(p)
    try:
        suite = from_dict(SuiteConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if limit:
        for task in suite.tasks:
            task.limit = min(task.limit or limit, limit)
    validate_suite(suite, str(p))
    for i, task in enumerate(suite.tasks):  # paths relative to the suite file, checked before any benchmark
        task.data = rebase_spec(task.data, p.parent) if task.data else None
        task.words = rebase_path(task.words, p.parent) if task.words else None
        if task.templates and (p.parent / task.templates).is_file():
            task.templates = rebase_path(task.templates, p.parent)
        if task.data:
            check_spec_paths(task.data, f"{p}: tasks[{i}].data")
    return suite


def run_suite(suite: SuiteConfig, models: Mapping[str, Any], reference: str | None = "teacher",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every task over every model; returns ``{"models": {name: M}, "bias": …}`` (bias if asked for)."""
    from mmkd.eval.efficiency import count_parameters

    metrics: dict[str, Any] = {"models": {}}
    blocks: dict[str, dict[str, Any]] = metrics["models"]
    ctx = EvalContext(dict(models), suite.cache_dir, suite.world_n, reference if reference in models else None,
                      log=log)
    for name, model in models.items():
        counts = count_parameters(model)
        blocks[name] = {"params": counts["total"], "params_per_tower": counts}
    # efficiency first: its memory figures are cleanest before datasets and embeddings fill the process
    for task in sorted(suite.tasks, key=lambda t: t.kind != "efficiency"):
        result = run_spec(task, ctx)
        if EVALS.get(task.kind).across_models:  # the bias probe: one top-level block comparing the models
            metrics[task.kind] = result
        elif _one_per_suite(task):  # efficiency: its keys at the top of each model's block
            for name, block in result.items():
                blocks[name].update(block)
        else:  # zeroshot/retrieval: keyed by the task's name
            for name, value in result.items():
                blocks[name].setdefault(task.kind, {})[task.name] = value
    return metrics


def _refuse_foreign(target: Path) -> None:
    """Replace an earlier ``eval all`` result, never another command's metrics.json (a demo's or a run's)."""
    if not target.is_file():
        return
    try:
        previous = json.loads(target.read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    if not (isinstance(previous, dict) and isinstance(previous.get("eval"), dict) and "suite" in previous["eval"]):
        raise UsageError(f"{target} exists and was not written by mmkd eval all (e.g. a demo's or a distill run's); "
                         "choose another --out folder so it is not overwritten")


def evaluate_all(suite_path: str | Path, model_paths: Mapping[str, str], out_dir: str | Path,
                 limit: int | None = None, log: Callable[[str], None] = print, device: str = "auto"
                 ) -> dict[str, Any]:
    """``mmkd eval all``: load the models onto ``device``, run the suite, write ``OUT/metrics.json``; returns the
    metrics."""
    from mmkd.devices import resolve_device
    from mmkd.models.hub import load_dual_encoder

    suite = load_suite(suite_path, limit)
    target = Path(out_dir) / "metrics.json"
    _refuse_foreign(target)
    start = time.perf_counter()
    where = resolve_device(device, "--device")
    models = {name: load_dual_encoder(path).to(where) for name, path in model_paths.items()}
    metrics = run_suite(suite, models, "teacher", log)
    metrics["eval"] = {"suite": suite.name, "suite_file": str(suite_path), "models": dict(model_paths),
                       "tasks": [asdict(t) for t in suite.tasks],
                       "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(target, metrics)
    return metrics
