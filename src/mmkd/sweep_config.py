"""The typed sweep file (``mmkd sweep``): a run config every grid point starts from, plus its ``sweep`` section
(grid axes, named objective sets, seeds), read with the run config's YAML rules and errors that name the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd.config import ObjectiveSpec, expanded
from mmkd.config_io import from_dict, read_yaml
from mmkd.errors import ConfigError


@dataclass
class SweepSection:
    """A sweep file's ``sweep:`` section (``mmkd sweep``; see README, "Sweeps").

    grid: axes, each a list of values; an axis named by a config key (``train.lr``) overrides that key, any other
    axis's values name ``sets`` or ``variants``. sets: named objective lists, concatenated axis by axis into a run's
    objectives. variants: named bundles of ``key: value`` overrides (several keys that only make sense together,
    e.g. a teacher ensemble with its caches, or views with RandAugment). baseline: a grid point every other row's
    Δ top-1 is measured against (paired by seed), instead of a from-scratch reference (then none is added).
    keep_checkpoints: keep each finished run's ``checkpoints/`` (hundreds of MB per run for a real model); by default
    they are deleted once the run has its student folder and metrics.json.
    """

    out: str | None = None  # default: the run config's out
    grid: dict[str, list[Any]] = field(default_factory=dict)
    sets: dict[str, list[ObjectiveSpec]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: str | None = None  # a grid point's name (e.g. "setting-k1"): Δ vs it instead of vs scratch
    # N: every grid point with seeds train.seed, train.seed+1, …, +N-1; a list: those seeds; None: train.seed only
    seeds: Any = None
    # false: a finished run's checkpoints are deleted (its student folder and metrics stay); true: kept
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key} must be a non-empty list of values")
        if self.seeds is not None:
            check_seeds(self.seeds, "sweep.seeds")
        for name, overrides in self.variants.items():
            if not isinstance(overrides, dict) or not overrides:
                raise ValueError(f"variants.{name} must be a non-empty mapping of config keys to values "
                                 "(e.g. {data.views: 10, data.augment: true})")
        clash = sorted(set(self.sets) & set(self.variants))
        if clash:
            raise ValueError(f"variants.{clash[0]} has the name of a set; give variants and sets distinct names")


def check_seeds(value: Any, where: str) -> int | list[int]:
    """A sweep's seeds: a count N ≥ 1 or a non-empty list of distinct integer seeds (errors name ``where``)."""
    example = "0,1,2" if where.startswith("--") else "[0, 1, 2]"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where}: {value} seeds; give a count ≥ 1 (e.g. 3) or a list of seeds (e.g. {example})")
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: {value} repeats a seed; list each seed once")
        return list(value)
    raise ConfigError(f"{where}: {value!r} is neither a count ≥ 1 (e.g. 3) nor a non-empty list of integer seeds "
                      f"(e.g. {example})")


def parse_seeds_arg(raw: str) -> int | list[int]:
    """``--seeds 3`` (a count) or ``--seeds 0,1,2`` (the seeds; ``--seeds 7,`` is the one seed 7)."""
    try:
        value: Any = ([int(v) for v in raw.split(",") if v.strip()] if "," in raw else int(raw))
    except ValueError:
        value = raw
    return check_seeds(value, f"--seeds {raw}")


@dataclass
class SweepConfig:
    """A sweep file: a run config (``run``, the keys every grid point starts from, overrides applied) plus its
    ``sweep`` section. ``run`` stays a mapping because each grid point overrides it before it becomes a
    RunConfig; ``load_sweep_config`` checks that it is one."""

    run: dict[str, Any] = field(default_factory=dict)
    sweep: SweepSection = field(default_factory=SweepSection)


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep file: its ``sweep`` section typed (errors name ``sweep.KEY``), the run config read as
    ``load_config`` reads it (recipes and student presets expanded, ``overrides`` applied); each grid point
    validates it."""
    data = read_yaml(path)
    section = data.pop("sweep", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'sweep' must be a mapping with keys "
                          f"{', '.join(f.name for f in dataclasses.fields(SweepSection))}")
    sweep = from_dict(SweepSection, section, "sweep")
    return SweepConfig(expanded(data, overrides), sweep)
