"""``mmkd sweep CONFIG --grid key=v1,v2 …``: run a grid of distillation runs and rank them on one leaderboard.

A sweep config is a run config (see ``mmkd distill``) plus a ``sweep`` section::

    sweep:
      out: runs/s1_compare            # default: the run config's out
      sets:                           # named objective lists
        triplet: [{name: triplet}]
        mse: [{name: fd_mse, towers: [image, text]}]
      variants:                       # named bundles of key=value overrides
        views10: {data.augment: true, data.views: 10}
      grid:                           # axes; the runs are their cartesian product
        task: [triplet, clip]         # an axis whose values name sets: the run's objectives are the
        kd: [none, mse]               #   concatenation of the chosen sets, axis by axis
        train.lr: [1.0e-3]            # an axis named by a config key: a key=value override
        setting: [views10]            # an axis whose values name variants: their overrides
      baseline: task-clip__kd-none__setting-views10   # optional: Δ vs this grid point, not vs scratch

``--grid key=v1,v2`` adds an axis or replaces one. A run is finished when its ``metrics.json`` exists; a
re-run skips it. A run whose objectives need no teacher is a *scratch* reference (the same student trained
with the task loss only); if the grid has none, one is added, unless ``baseline`` names the grid point every row
is compared with instead. The teacher is evaluated as a reference row.
Teacher targets are computed once per sweep (not once per run), so the sweep costs only student time.
Under ``torchrun`` each process takes every N-th run (no DDP inside a run); rank 0 writes the leaderboard.

``sweep.seeds`` (or ``--seeds``) runs every grid point, scratch references included, once per seed
(``train.seed``); the run with the config's own seed keeps the grid point's name, the others get ``__seed-S``,
so a finished one-seed sweep grows to N seeds by running only the new ones. Each run is paired with the scratch
reference of its own seed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mmkd.config import ConfigError, RunConfig, validate
from mmkd.config_io import apply_overrides, from_dict, parse_value, to_dict
from mmkd.dist import DistInfo
from mmkd.eval.perimage import write_per_image
from mmkd.fileio import atomic_write_json
from mmkd.locking import FolderLock
from mmkd.objectives import OBJECTIVES
from mmkd.objectives.base import check_specs
from mmkd.pipeline import run_distill, run_eval_specs
from mmkd.preflight import warn
from mmkd.run_setup import TargetCache
from mmkd.sweep_config import load_sweep_config, parse_seeds_arg
from mmkd.teacher.unimodal import ImageTeacher
from mmkd.teacher_spec import cache_folder, short_name
from mmkd.train.checkpoint import CheckpointError
from mmkd.train.runfolder import RunFolderError


@dataclass
class Run:
    name: str
    cfg: RunConfig
    axes: dict[str, Any]
    role: str  # "scratch" (no teacher term) or "distilled"
    added: bool = False  # a scratch reference the sweep added itself
    seed: int = 0  # train.seed
    point: str = ""  # the grid point's name (the run's name without its seed suffix): the leaderboard's row
    config_axes: dict[str, Any] = field(default_factory=dict)  # the axes that change the config (keys, variants)

    @property
    def reference(self) -> str:
        """The key this run shares with its from-scratch reference (the leaderboard pairs rows by it)."""
        return reference_key(self)


@dataclass
class Sweep:
    out: Path
    runs: list[Run]
    axes: dict[str, list[Any]]
    sets: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    command: str = ""  # the `mmkd sweep` command line that gives this sweep (recorded with the leaderboard)
    baseline: str | None = None  # the grid point Δ top-1 is measured against (None: each run's scratch reference)
    keep_checkpoints: bool = False  # sweep.keep_checkpoints: keep finished runs' checkpoints/ (default: delete)


def _parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    if "=" not in item:
        raise ConfigError(f"--grid {item!r} must look like key=v1,v2 (e.g. kd=none,mse or train.lr=1e-3,3e-3)")
    key, _, raw = item.partition("=")
    try:
        values = [parse_value(v.strip()) for v in raw.split(",")]
    except yaml.YAMLError as e:
        raise ConfigError(f"--grid {item!r}: a value is not valid YAML: {e}") from None
    if not key.strip() or not values:
        raise ConfigError(f"--grid {item!r}: give a key and at least one value")
    return key.strip(), values


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


MAX_SLUG = 80  # a run folder's name stays well below file systems' 255-byte limit


def _axis_slug(key: str, value: Any) -> str:
    """An axis value in a run's name; a teacher ensemble's members joined by ``+``, each by its folder's name (the
    part that tells teachers apart), cut to MAX_SLUG characters with a hash of the whole where longer."""
    if not (key == "teacher" and isinstance(value, list)):
        return _slug(value)
    text = "+".join(_slug(short_name(str(v)) or v) for v in value)
    if len(text) > MAX_SLUG:
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        text = f"{text[:MAX_SLUG - 9]}-{digest}"
    return text


def _config_fields() -> set[str]:
    return {f.name for f in fields(RunConfig)}


def _seed_list(spec: int | list[int] | None, base: dict[str, Any]) -> tuple[list[int], int]:
    """The sweep's seeds and the config's own ``train.seed`` (the seed whose runs keep the plain name)."""
    probe = from_dict(RunConfig, {k: v for k, v in base.items() if k == "train"}) if "train" in base else RunConfig()
    first = probe.train.seed
    if spec is None:
        return [first], first
    return (list(range(first, first + spec)) if isinstance(spec, int) else list(spec)), first


def load_sweep(path: str | Path, grid: list[str] | None = None, overrides: list[str] | None = None,
               out: str | Path | None = None, seeds: str | None = None) -> Sweep:
    """Read a sweep config, expand its grid into validated run configs (before any compute is spent).

    seeds: ``--seeds`` as typed (a count or a comma list), replacing ``sweep.seeds``."""
    config = load_sweep_config(path, overrides)
    base, section = config.run, config.sweep
    sets = {name: [to_dict(o) for o in objectives] for name, objectives in section.sets.items()}
    axes: dict[str, list[Any]] = dict(section.grid)
    for item in grid or []:
        key, values = _parse_grid_arg(item)
        axes[key] = values  # added, or replacing the file's axis
    config_keys = _config_fields()
    for name, bundle in section.variants.items():
        bad = next((k for k in bundle if str(k).split(".")[0] not in config_keys), None)
        if bad is not None:
            raise ConfigError(f"sweep.variants.{name}: {bad!r} is not a config key; config keys: "
                              f"{', '.join(sorted(config_keys))}")
    for key, values in axes.items():
        if key.split(".")[0] in config_keys:
            continue
        kinds = {"set" if str(v) in sets else "variant" if str(v) in section.variants else "none" for v in values}
        missing = [v for v in values if str(v) not in sets and str(v) not in section.variants]
        if missing:
            raise ConfigError(f"sweep.grid.{key}: {missing[0]!r} names no objective set or variant; sets: "
                              f"{', '.join(sorted(sets)) or 'none'}; variants: "
                              f"{', '.join(sorted(section.variants)) or 'none'} (an axis named by a config key, e.g. "
                              f"train.lr, takes plain values instead; config keys: {', '.join(sorted(config_keys))})")
        if len(kinds) > 1:
            raise ConfigError(f"sweep.grid.{key}: its values name both objective sets and variants; give each kind "
                              "its own axis")
    seed_spec = parse_seeds_arg(seeds) if seeds is not None else section.seeds
    seed_list, first = _seed_list(seed_spec, base)
    if seed_spec is not None and "train.seed" in axes:
        raise ConfigError(f"{'--seeds' if seeds is not None else 'sweep.seeds'} and the grid axis train.seed both "
                          "set train.seed; keep one of them")
    out_arg, out = out, Path(out or section.out or base.get("out") or "runs/sweep")
    combos = list(itertools.product(*axes.values())) or [()]
    runs = [_make_run(base, sets, section.variants, dict(zip(axes, combo)), out, seed, first)
            for combo in combos for seed in seed_list]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep: two grid points give the same run name ({names}); make the values distinct")
    if section.baseline is not None and section.baseline not in {r.point for r in runs}:
        raise ConfigError(f"sweep.baseline: {section.baseline!r} is not a grid point of this sweep; grid points: "
                          f"{', '.join(dict.fromkeys(r.point for r in runs))}")
    command = shlex.join(["mmkd", "sweep", str(path), *(f"--grid={g}" for g in grid or []), *(overrides or []),
                          *(["--out", str(out_arg)] if out_arg else []), *(["--seeds", seeds] if seeds else [])])
    if section.baseline is None:
        runs = _add_scratch_references(runs, out, first)
    return Sweep(out, runs, axes, sets, seed_list, command, section.baseline, section.keep_checkpoints)


def _seed_suffix(seed: int, first: int) -> str:
    return "" if seed == first else f"__seed-{seed}"


def _make_run(base: dict[str, Any], sets: dict[str, list[Any]], variants: dict[str, dict[str, Any]],
              axes: dict[str, Any], out: Path, seed: int, first: int) -> Run:
    data = copy.deepcopy(base)
    data.setdefault("train", {})
    if isinstance(data["train"], dict):  # (not a mapping: validation below names train)
        data["train"]["seed"] = seed
    config_keys = _config_fields()
    named = [k for k in axes if k.split(".")[0] not in config_keys]
    objective_axes = [k for k in named if str(axes[k]) in sets]
    if objective_axes:
        data["objectives"] = [copy.deepcopy(o) for k in objective_axes for o in sets[str(axes[k])]]
    for k in named:  # a variant's overrides first, so that a config-key axis can still override one of them
        if k not in objective_axes:
            apply_overrides(data, [f"{key}={json.dumps(v)}" for key, v in variants[str(axes[k])].items()])
    apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in axes.items() if k not in named])
    point = "__".join(f"{_slug(k)}-{_axis_slug(k, v)}" for k, v in axes.items()) or "run"
    name = point + _seed_suffix(seed, first)
    data["out"] = str(out / "runs" / name)
    try:
        cfg = from_dict(RunConfig, data)
        validate(cfg)
        check_specs(cfg.objectives)
    except ConfigError as e:
        raise ConfigError(f"sweep run {name}: {e}") from None
    role = "distilled" if any(OBJECTIVES.get(o.name).uses_teacher for o in cfg.objectives) else "scratch"
    return Run(name, cfg, axes, role, seed=seed, point=point,
               config_axes={k: v for k, v in axes.items() if k not in objective_axes})


def task_objectives(cfg: RunConfig) -> list[Any]:
    return [o for o in cfg.objectives if not OBJECTIVES.get(o.name).uses_teacher]


def reference_key(run: Run) -> str:
    """Runs with the same task objectives, config-axis values (variants included) and seed share one from-scratch
    reference."""
    task = [(o.name, o.weight, o.towers, o.params) for o in task_objectives(run.cfg)]
    return json.dumps([task, run.config_axes, run.seed], sort_keys=True, default=str)


def _add_scratch_references(runs: list[Run], out: Path, first: int) -> list[Run]:
    """For every group of runs without a task-loss-only run of its own, a scratch reference run first."""
    have = {reference_key(r) for r in runs if r.role == "scratch"}
    added: dict[str, Run] = {}
    for run in runs:
        key = reference_key(run)
        if key in have or key in added:
            continue
        task = task_objectives(run.cfg)
        if not task:
            raise ConfigError(f"sweep run {run.name} has no task objective (clip, triplet, siglip), so it has no "
                              "from-scratch reference; add one to its objectives")
        axes = dict(run.config_axes)
        point = "__".join(["reference-scratch", "+".join(o.name for o in task),
                           *(f"{_slug(k)}-{_axis_slug(k, v)}" for k, v in axes.items())])
        name = point + _seed_suffix(run.seed, first)
        cfg = copy.deepcopy(run.cfg)
        cfg.objectives = task
        cfg.out = str(out / "runs" / name)
        added[key] = Run(name, cfg, axes, "scratch", added=True, seed=run.seed, point=point, config_axes=axes)
    return list(added.values()) + runs


def _run_done(run: Run) -> bool:
    return (Path(run.cfg.out) / "metrics.json").is_file()


def _teacher_row(sweep: Sweep, cache: TargetCache, log: Any) -> dict[str, Any] | None:
    """The teacher evaluated like the students (once; reused from OUT/teacher/metrics.json)."""
    cfg = sweep.runs[0].cfg
    if not cfg.teacher or not cfg.eval:
        return None
    path = sweep.out / "teacher" / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text())
    if isinstance(cfg.teacher, list):
        log("the teacher is an ensemble: no single teacher row (evaluate a member with `mmkd eval`)")
        return None
    if cache_folder(cfg.teacher) is not None:
        log(f"the teacher is a cache ({cfg.teacher}): its weights are never loaded, so no teacher row")
        return None
    teacher = cache.teacher(cfg)
    if isinstance(teacher, ImageTeacher):
        log("the teacher is an image model only: no zero-shot or retrieval row for it")
        return None
    log(f"evaluating the teacher {cfg.teacher}")
    per_image: dict[str, Any] = {}
    metrics = {"eval": run_eval_specs(teacher, cfg, per_image), "teacher": cfg.teacher}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_per_image(path.parent, per_image)
    atomic_write_json(path, metrics)
    return metrics


def run_sweep(sweep: Sweep, log: Any = print, progress: bool = True, poll_s: float = 5.0) -> Path:
    """Run the unfinished runs (this process's share under torchrun), then write the leaderboard.

    Unfinished runs resume from their last checkpoint. The sweep folder is locked: a second ``mmkd sweep`` into
    it fails at once naming the first one's PID.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    sweep.out.mkdir(parents=True, exist_ok=True)
    # one sweep per folder (rank 0 holds it for all ranks); every run folder is locked again by its run
    with FolderLock(sweep.out, "sweep folder") if rank == 0 else nullcontext():
        return _run_sweep(sweep, rank, world, log, progress, poll_s)


def _drop_checkpoints(sweep: Sweep, run: Run) -> None:
    """A finished run's checkpoints are deleted unless ``sweep.keep_checkpoints``: its student and metrics stay."""
    folder = Path(run.cfg.out) / "checkpoints"
    if not sweep.keep_checkpoints and _run_done(run) and folder.is_dir():
        shutil.rmtree(folder)


def _run_sweep(sweep: Sweep, rank: int, world: int, log: Any, progress: bool, poll_s: float) -> Path:
    from mmkd.report.leaderboard import write_leaderboard

    if rank == 0:
        atomic_write_json(sweep.out / "sweep.json", {"axes": sweep.axes, "seeds": sweep.seeds,
                                                     "baseline": sweep.baseline, "runs": [
            {"name": r.name, "point": r.point, "seed": r.seed, "role": r.role, "axes": r.axes, "added": r.added,
             "out": r.cfg.out,
             "objectives": [{"name": o.name, "weight": o.weight, "towers": o.towers, "params": o.params}
                            for o in r.cfg.objectives]} for r in sweep.runs]})
        if not any(e.kind == "zeroshot" for r in sweep.runs for e in r.cfg.eval):
            warn("the sweep's runs have no zeroshot entry in eval:, so the leaderboard's top-1 and Δ columns stay "
                 "empty; add one, e.g. {kind: zeroshot, data: \"cifar10:DIR\", split: test}")
    cache = TargetCache()
    mine = [r for i, r in enumerate(sweep.runs) if i % world == rank]
    for i, run in enumerate(mine, 1):
        if _run_done(run):
            log(f"[{i}/{len(mine)}] {run.name}: finished before (metrics.json exists), skipped")
            _drop_checkpoints(sweep, run)
            continue
        log(f"[{i}/{len(mine)}] {run.name}: {', '.join(o.name for o in run.cfg.objectives)}")
        t0 = time.perf_counter()
        # a run a killed sweep left half-way continues from its checkpoint; another config's run there refuses
        try:
            run_distill(run.cfg, resume="auto", info=DistInfo(), cache=cache, log=log, progress=progress)
        except (RunFolderError, CheckpointError) as e:  # `mmkd sweep` has no --overwrite: advice that fits it
            found = re.split(r"[;.] ", str(e), maxsplit=1)[0]
            raise RunFolderError(f"sweep run {run.name}: {found}; this sweep cannot continue that run: move "
                                 f"{run.cfg.out} away (or delete it), or give the sweep another sweep.out") from None
        log(f"[{i}/{len(mine)}] {run.name}: done in {time.perf_counter() - t0:.0f} s")
        _drop_checkpoints(sweep, run)
    if rank != 0:
        return sweep.out
    while not all(_run_done(r) for r in sweep.runs):  # the other processes' runs (torchrun kills us on failure)
        time.sleep(poll_s)
    teacher = _teacher_row(sweep, cache, log)
    return write_leaderboard(sweep, teacher)
