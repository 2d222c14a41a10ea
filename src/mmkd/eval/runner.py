"""``mmkd eval all``: a suite of evaluations (a YAML file) run over a teacher and students into metrics.json.

A suite lists tasks; each kind is a registered function, so adding a benchmark kind adds one function and no
branch. Per-model results land in the model blocks of metrics.json (``zeroshot`` and ``retrieval`` keyed by
the task's name, efficiency keys at the top of the block); the bias probe compares models, so it is a
top-level ``bias`` block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmkd.config import ConfigError, from_dict, load_yaml
from mmkd.data import sources
from mmkd.data.records import Record
from mmkd.errors import UsageError
from mmkd.fileio import atomic_write_json
from mmkd.registry import Registry


@dataclass
class TaskSpec:
    """One evaluation of a suite. Which keys matter depends on ``kind`` (see README, "mmkd eval all")."""

    kind: str = "zeroshot"  # zeroshot | retrieval | bias | efficiency
    data: str | None = None  # FORMAT:PATH; required for zeroshot/retrieval, optional for bias (image probe)
    name: str | None = None  # key in metrics.json; default: the world class set or the data format
    class_set: str | None = None  # world:… only: colour_shape, shape, colour
    split: str = "test"  # cifar10/cifar100/stl10 only
    limit: int | None = None  # first N records only
    templates: str | None = None  # zeroshot: built-in ensemble name or template file (default: by format)
    words: str | None = None  # bias: word-list YAML (default: the packaged assets/bias_words.yaml)
    template: str | None = None  # bias: text-probe prompt, overrides the word file's
    min_group_images: int = 5  # bias: fewest images per caption group for the image probe
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])  # efficiency
    budget_s: float = 3.0  # efficiency: seconds of timing per model
    threads: int | None = None  # efficiency: CPU threads while timing (default: torch's current setting)


@dataclass
class SuiteConfig:
    name: str = "suite"
    cache_dir: str = "runs/.cache"  # built-in world images
    world_n: int = 2000  # images in a built-in world split
    tasks: list[TaskSpec] = field(default_factory=list)


@dataclass
class EvalContext:
    """What every task function gets: the models (name → model), the metrics being filled, shared caches."""

    suite: SuiteConfig
    models: dict[str, Any]
    metrics: dict[str, Any]
    reference: str | None = "teacher"
    log: Callable[[str], None] = print
    _records: dict[tuple[str, str, int | None], list[Record]] = field(default_factory=dict)

    def records(self, task: TaskSpec) -> list[Record]:
        assert task.data is not None
        key = (task.data, task.split, task.limit)
        if key not in self._records:
            self._records[key] = eval_records(task.data, self.suite.cache_dir, self.suite.world_n, task.split,
                                              task.limit)
        return self._records[key]

    def model_block(self, name: str) -> dict[str, Any]:
        return self.metrics["models"].setdefault(name, {})


TaskFn = Callable[[TaskSpec, EvalContext], None]
TASKS: Registry[TaskFn] = Registry("evaluation kind")


def data_format(spec: str) -> str:
    return spec.partition(":")[0].strip().lower()


def eval_records(spec: str, cache_dir: str | Path = "runs/.cache", world_n: int = 2000, split: str = "test",
                 limit: int | None = None) -> list[Record]:
    """Records of a data spec for evaluation: ``split`` goes to the formats that have splits (CIFAR, STL-10)."""
    from mmkd.data.resolve import records_from_spec, split_options

    records = records_from_spec(spec, cache_dir, world_n=world_n, **split_options(spec, split))
    return records[:limit] if limit else records


# ------------------------------------------------------------------------------------------------- tasks


@TASKS.register("zeroshot")
def _zeroshot(task: TaskSpec, ctx: EvalContext) -> None:
    from mmkd.data.resolve import zeroshot_classes
    from mmkd.eval.suite import world_labels, zeroshot

    assert task.data is not None
    records = ctx.records(task)
    names, templates = zeroshot_classes(task.data, task.class_set, task.templates, task.split)
    labels = world_labels(records, task.class_set or "colour_shape") if data_format(task.data) == "world" else None
    for name, model in ctx.models.items():
        ctx.log(f"zero-shot {task.name} ({len(records)} images, {len(names)} classes, {len(templates)} "
                f"templates): {name}")
        ctx.model_block(name).setdefault("zeroshot", {})[task.name] = zeroshot(model, records, names, templates,
                                                                               labels)


@TASKS.register("retrieval")
def _retrieval(task: TaskSpec, ctx: EvalContext) -> None:
    from mmkd.eval.suite import retrieval

    records = ctx.records(task)
    for name, model in ctx.models.items():
        ctx.log(f"retrieval {task.name} ({len(records)} images): {name}")
        ctx.model_block(name).setdefault("retrieval", {})[task.name] = retrieval(model, records)


@TASKS.register("efficiency")
def _efficiency(task: TaskSpec, ctx: EvalContext) -> None:
    from mmkd.eval.efficiency import efficiency_metrics

    for name, model in ctx.models.items():
        ctx.log(f"efficiency: {name}")
        block = efficiency_metrics(model, task.batch_sizes, task.budget_s, threads=task.threads)
        ctx.model_block(name).update(block)


@TASKS.register("bias")
def _bias(task: TaskSpec, ctx: EvalContext) -> None:
    from mmkd.eval.bias import bias_probe, load_bias_words

    words = load_bias_words(task.words, task.template)
    records = ctx.records(task) if task.data else None
    ctx.log(f"bias probe ({len(words.professions)} professions{', images of ' + task.data if task.data else ''})")
    ctx.metrics["bias"] = bias_probe(ctx.models, words, ctx.reference, records, task.data, task.min_group_images)


# ------------------------------------------------------------------------------------------ suite handling


def _default_name(task: TaskSpec) -> str:
    if task.kind == "zeroshot" and task.data and data_format(task.data) == "world":
        return task.class_set or "colour_shape"
    return data_format(task.data) if task.data else task.kind


def validate_suite(suite: SuiteConfig, where: str = "suite") -> SuiteConfig:
    """Kinds known, required data present, names unique per kind; errors name the task (``tasks[i]``)."""
    if not suite.tasks:
        raise ConfigError(f"{where}: 'tasks' is empty; list at least one, e.g. {{kind: zeroshot, data: world:test}}")
    seen: dict[tuple[str, str], int] = {}
    for i, task in enumerate(suite.tasks):
        at = f"{where}: tasks[{i}]"
        if task.kind not in TASKS:
            raise ConfigError(f"{at}.kind: unknown kind {task.kind!r}; valid: {', '.join(TASKS.names())}")
        if task.kind in ("zeroshot", "retrieval") and not task.data:
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
        key = (task.kind, task.name if task.kind in ("zeroshot", "retrieval") else "")
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
    try:
        data = load_yaml(p.read_text(), p)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping with 'tasks'")
    try:
        suite = from_dict(SuiteConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if limit:
        for task in suite.tasks:
            task.limit = min(task.limit or limit, limit)
    return validate_suite(suite, str(p))


def run_suite(suite: SuiteConfig, models: Mapping[str, Any], reference: str | None = "teacher",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every task over every model; returns ``{"models": {name: M}, "bias": …}`` (bias if asked for)."""
    from mmkd.eval.efficiency import count_parameters

    metrics: dict[str, Any] = {"models": {}}
    ctx = EvalContext(suite, dict(models), metrics, reference if reference in models else None, log)
    for name, model in models.items():
        counts = count_parameters(model)
        ctx.model_block(name).update({"params": counts["total"], "params_per_tower": counts})
    # efficiency first: its memory figures are cleanest before datasets and embeddings fill the process
    for task in sorted(suite.tasks, key=lambda t: t.kind != "efficiency"):
        TASKS.get(task.kind)(task, ctx)
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
                 limit: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``mmkd eval all``: load the models, run the suite, write ``OUT/metrics.json``; returns the metrics."""
    from mmkd.models.hub import load_dual_encoder

    suite = load_suite(suite_path, limit)
    target = Path(out_dir) / "metrics.json"
    _refuse_foreign(target)
    start = time.perf_counter()
    models = {name: load_dual_encoder(path) for name, path in model_paths.items()}
    metrics = run_suite(suite, models, "teacher", log)
    metrics["eval"] = {"suite": suite.name, "suite_file": str(suite_path), "models": dict(model_paths),
                       "tasks": [asdict(t) for t in suite.tasks],
                       "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(target, metrics)
    return metrics
