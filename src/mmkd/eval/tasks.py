"""One dispatch for every evaluation: ``distill``'s ``eval:`` list, ``mmkd eval KIND`` and suites (``eval all``).

Each kind is a registered function of an ``EvalSpec`` and an ``EvalContext`` (the models by name, the data
options, a record cache), so adding a benchmark kind adds one function and no branch. A kind returns
``{model name: result}`` when it scores models one by one, or one block comparing them (``across_models``,
the bias probe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmkd.config import EvalSpec
from mmkd.data.records import Record
from mmkd.errors import ConfigError
from mmkd.registry import Registry

RUN_EVAL_DATA = "world:test"  # a run's ``eval:`` entry without ``data``
DEFAULT_SPLIT = "test"  # CIFAR/STL-10: their test split unless told otherwise
WORLD_N = 2000  # images in a built-in world split


def data_format(spec: str) -> str:
    return spec.partition(":")[0].strip().lower()


def eval_records(spec: str, cache_dir: str | Path = "runs/.cache", world_n: int = WORLD_N,
                 split: str = DEFAULT_SPLIT, limit: int | None = None) -> list[Record]:
    """Records of a data spec for evaluation: ``split`` goes to the formats that have splits (CIFAR, STL-10)."""
    from mmkd.data.resolve import records_from_spec, split_options

    records = records_from_spec(spec, cache_dir, world_n=world_n, **split_options(spec, split))
    return records[:limit] if limit else records


@dataclass
class EvalContext:
    """What every kind gets: the models (name → model), where data comes from, and records read once.

    world_n: images of a built-in world split; None: the spec's ``limit`` (the world draws a prefix-stable
    sequence, so a limit needs only that many images generated), else ``WORLD_N``.
    strict_split: a split named explicitly must exist for the format (a run's ``eval:``); else it is ignored
    by the formats without splits.
    per_image: where zero-shot kinds leave each image's top-1 correctness (``mmkd sweep``'s intervals need it).
    """

    models: dict[str, Any]
    cache_dir: str | Path = "runs/.cache"
    world_n: int | None = WORLD_N
    reference: str | None = "teacher"
    strict_split: bool = False
    log: Callable[[str], None] = print
    per_image: dict[str, dict[str, Any]] | None = None  # when a dict: {spec name: {model: top-1 hits [N]}}
    _records: dict[tuple[str, str, int | None, int], list[Record]] = field(default_factory=dict)

    def records(self, spec: EvalSpec) -> list[Record]:
        data = spec_data(spec)
        if spec.split and self.strict_split:
            from mmkd.data.resolve import split_options

            split_options(data, spec.split, strict=True)
        split = spec.split or DEFAULT_SPLIT
        world_n = self.world_n or spec.limit or WORLD_N
        key = (data, split, spec.limit, world_n)
        if key not in self._records:
            self._records[key] = eval_records(data, self.cache_dir, world_n, split, spec.limit)
        return self._records[key]


@dataclass(frozen=True)
class EvalKind:
    run: Callable[[EvalSpec, EvalContext], dict[str, Any]]
    needs_data: bool = False  # zero-shot and retrieval score a data set; bias may, efficiency never does
    across_models: bool = False  # one block comparing the models (bias), not one result per model
    named: bool = False  # results keyed by the spec's name in a model's block (several per suite)


EVALS: Registry[EvalKind] = Registry("evaluation kind")


def spec_data(spec: EvalSpec) -> str:
    """The data a spec scores; a run's ``eval:`` entry without ``data`` means the built-in world's test split."""
    return spec.data or RUN_EVAL_DATA


def world_class_labels(records: Sequence[Record], spec: EvalSpec) -> list[int] | None:
    """Labels for the spec's class set: the built-in world derives shape/colour from colour_shape; others None."""
    from mmkd.eval.suite import world_labels

    return world_labels(records, spec.class_set or "colour_shape") if data_format(spec_data(spec)) == "world" \
        else None


NEAR_CHANCE = 2.0  # a teacher's top-1 below this many times chance is noted: it has little to teach on that set


def _zeroshot(spec: EvalSpec, ctx: EvalContext) -> dict[str, Any]:
    from mmkd.data.resolve import zeroshot_classes
    from mmkd.eval.suite import zeroshot_and_hits

    records = ctx.records(spec)
    names, templates = zeroshot_classes(spec_data(spec), spec.class_set, spec.templates,
                                        spec.split or DEFAULT_SPLIT)
    labels = world_class_labels(records, spec)
    out = {}
    for name, model in ctx.models.items():
        ctx.log(f"zero-shot {spec.name} ({len(records)} images, {len(names)} classes, {len(templates)} "
                f"templates): {name}")
        out[name], hits = zeroshot_and_hits(model, records, names, templates, labels, sigmoid=spec.sigmoid)
        chance = 1 / len(names)
        if name == ctx.reference and out[name]["top1"] < NEAR_CHANCE * chance:
            ctx.log(f"note: the teacher is near chance on {spec.name}: top-1 {out[name]['top1']:.1%} over "
                    f"{len(names)} classes (chance {chance:.1%}); a student distilled from it learns little of "
                    "this task, and \"kept of teacher\" on it means nothing")
        if ctx.per_image is not None:
            ctx.per_image.setdefault(spec.name or spec.kind, {})[name] = hits
    return out


def _retrieval(spec: EvalSpec, ctx: EvalContext) -> dict[str, Any]:
    from mmkd.eval.suite import retrieval

    records = ctx.records(spec)
    out = {}
    for name, model in ctx.models.items():
        ctx.log(f"retrieval {spec.name} ({len(records)} images): {name}")
        out[name] = retrieval(model, records)
    return out


def _efficiency(spec: EvalSpec, ctx: EvalContext) -> dict[str, Any]:
    from mmkd.eval.efficiency import efficiency_metrics

    out = {}
    for name, model in ctx.models.items():
        ctx.log(f"efficiency: {name}")
        out[name] = efficiency_metrics(model, spec.batch_sizes, spec.budget_s, threads=spec.threads)
    return out


def _bias(spec: EvalSpec, ctx: EvalContext) -> dict[str, Any]:
    from mmkd.eval.bias import bias_probe, load_bias_words

    words = load_bias_words(spec.words, spec.template)
    records = ctx.records(spec) if spec.data else None
    ctx.log(f"bias probe ({len(words.professions)} professions{', images of ' + spec.data if spec.data else ''})")
    return bias_probe(ctx.models, words, ctx.reference, records, spec.data, spec.min_group_images)


EVALS.register("zeroshot")(EvalKind(_zeroshot, needs_data=True, named=True))
EVALS.register("retrieval")(EvalKind(_retrieval, needs_data=True, named=True))
EVALS.register("efficiency")(EvalKind(_efficiency))
EVALS.register("bias")(EvalKind(_bias, across_models=True))


def run_spec(spec: EvalSpec, ctx: EvalContext) -> dict[str, Any]:
    """One evaluation over the context's models: ``{model: result}``, or the comparison block (bias)."""
    return EVALS.get(spec.kind).run(spec, ctx)


def check_kind(spec: EvalSpec, where: str) -> None:
    if spec.kind not in EVALS:
        raise ConfigError(f"{where}.kind: unknown kind {spec.kind!r}; valid: {', '.join(EVALS.names())}")


def run_eval_name(spec: EvalSpec) -> str:
    """A run's ``eval:`` key in metrics.json: ``KIND:DATA[:CLASS_SET]`` unless the spec names itself (``KIND``
    alone for a kind that reads no data: efficiency, or bias without images)."""
    data = spec_data(spec) if EVALS.get(spec.kind).needs_data else spec.data
    return spec.name or ":".join([spec.kind, *([data] if data else []), *([spec.class_set] if spec.class_set else [])])


def check_specs(specs: Sequence[EvalSpec], where: str = "eval") -> None:
    """Kinds known before any compute is spent (a run's ``eval:`` is checked before training)."""
    for i, spec in enumerate(specs):
        check_kind(spec, f"{where}[{i}]")


def evaluate(model: Any, specs: Sequence[EvalSpec], *, cache_dir: str | Path = "runs/.cache",
             log: Callable[[str], None] = lambda _: None, per_image: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score one model on every spec: ``{name: result}``, named as a run's ``eval:`` names them.

    Defaults are those of a run's ``eval:``: data ``world:test``, split ``test`` (an explicit one must exist),
    a built-in world of ``limit`` images when a limit is given. per_image: a dict to receive, per zero-shot
    entry's name, each test image's top-1 correctness (a bool tensor).
    """
    check_specs(specs)
    ctx = EvalContext({"model": model}, cache_dir, world_n=None, reference=None, strict_split=True, log=log,
                      per_image={} if per_image is not None else None)
    out: dict[str, Any] = {}
    for spec in specs:
        name = run_eval_name(spec)
        log(f"evaluating {name}")
        result = run_spec(replace(spec, name=name), ctx)
        out[name] = result if EVALS.get(spec.kind).across_models else result["model"]
    if per_image is not None and ctx.per_image is not None:
        per_image.update({name: by_model["model"] for name, by_model in ctx.per_image.items()})
    return out

