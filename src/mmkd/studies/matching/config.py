"""The matching study's YAML config: typed sections read by mmkd's config machinery (errors name the key).

One file configures every command (``mmkd matching build|train|sweep CONFIG key=value ...``): ``pairs`` says
what the pairs are built from and where they live, ``teacher`` / ``student`` / ``train`` / ``kd`` the models and
their training, ``sweep`` the KD grid. The demo's config adds ``settings`` (one pairs set per entry) and
``quick`` (the overrides ``--quick`` applies) and ``seeds`` (the students again per seed). See ``configs/matching/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mmkd.config_io import apply_overrides, from_dict, read_yaml
from mmkd.devices import DeviceError, check_device_spec
from mmkd.errors import ConfigError
from mmkd.studies.matching.losses import MATCHING_KD, KDConfig, check_kd_params
from mmkd.studies.matching.models import StudentConfig
from mmkd.studies.matching.pairs import BuildConfig
from mmkd.studies.matching.text import DEFAULT_TEXT_ENCODER
from mmkd.studies.matching.train import StudentTrainConfig, TeacherTrainConfig


@dataclass
class PairsConfig:
    """``build`` reads ``source`` and writes ``file`` (with its sidecar); ``train`` and ``sweep`` read ``file``."""

    source: str = "world:train"  # data spec FORMAT:PATH the pairs are built from
    file: str = "runs/matching/pairs.jsonl"
    world_n: int = 4000  # images in a built-in world split
    limit: int | None = None  # build from the first N images only
    cache_dir: str = "runs/.cache"  # the built-in world's images
    build: BuildConfig = field(default_factory=BuildConfig)


@dataclass
class TeacherConfig(TeacherTrainConfig):
    """The dual encoder to fine-tune as a matcher, and how (``TeacherTrainConfig``'s fields).

    source: a model folder or hub id (or a folder written by this study: a matching teacher, used as is).
    Without a source, ``pretrain`` names a distill config that trains one through ``run_distill`` (the path
    ``mmkd distill`` takes), once per config, into the study's cache.
    """

    source: str = ""
    pretrain: str | None = None
    pretrain_overrides: list[str] = field(default_factory=list)


@dataclass
class SweepGrid:
    """``mmkd matching sweep``: every variant × temperature × α, ranked on validation F1."""

    temperatures: list[float] = field(default_factory=lambda: [1.5, 2.0, 2.5, 3.0])
    alphas: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6])
    variants: list[str] = field(default_factory=lambda: ["kl", "bce"])

    def __post_init__(self) -> None:
        if not self.temperatures or not self.alphas or not self.variants:
            raise ValueError("the sweep needs at least one temperature, one alpha and one variant")
        for t in self.temperatures:
            for a in self.alphas:
                check_kd_params(t, a)
        for v in self.variants:
            MATCHING_KD.get(v)

    def configs(self) -> list[KDConfig]:
        return [KDConfig(v, float(t), float(a)) for v in self.variants for t in self.temperatures for a in self.alphas]


@dataclass
class MatchingConfig:
    pairs: PairsConfig = field(default_factory=PairsConfig)
    text_encoder: str = DEFAULT_TEXT_ENCODER  # the student's frozen sentence encoder (and the hard-negative miner)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: StudentTrainConfig = field(default_factory=StudentTrainConfig)
    kd: list[KDConfig] = field(default_factory=lambda: [KDConfig("kl", 3.0, 0.5), KDConfig("bce", 3.0, 0.5)])
    sweep: SweepGrid = field(default_factory=SweepGrid)
    out: str = "runs/matching/study"
    cache_dir: str | None = None  # the pretrained teacher and sentence features (default OUT/cache)
    threads: int | None = None  # torch threads (1 is fastest for these small models)
    device: str = "auto"  # auto | cpu | cuda | cuda:N: where the teacher and the students run (--device)

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"


@dataclass
class DemoSetting:
    """One pairs set of the demo: a data spec and its negatives."""

    data: str = "world:train"
    negatives: str = "random"
    world_n: int = 4000
    hard_candidates: str | None = None  # None: "drawn" on the world (templated captions), "all" elsewhere


@dataclass
class SeedsConfig:
    """The demo's students trained again with each seed, KD with and without the transfer set (``OUT/seeds.json``).

    The students are small enough that one seed moves their F1 by points; the spread over seeds says which
    differences are real. Each seed trains the baseline once and every ``kd`` student with ``train.transfer = 0``
    (the labelled pairs only) and with the config's ``train.transfer``; the seed the demo itself ran with reuses
    the demo's students. Empty ``seeds``: none.
    """

    seeds: list[int] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # which of the demo's settings (empty: every one)

    def __post_init__(self) -> None:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"each seed once, got {self.seeds}")


@dataclass
class DemoConfig(MatchingConfig):
    """The whole study on several pairs sets; ``settings.NAME=null`` drops one, ``--quick`` applies ``quick``."""

    settings: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)

    def seed_settings(self) -> list[str]:
        """The settings the ``seeds`` runs repeat (none when ``seeds.seeds`` is empty; a dropped one is skipped)."""
        names = list(self.setting_list())
        unknown = [s for s in self.seeds.settings if s not in self.settings]
        if unknown:
            raise ConfigError(f"seeds.settings: {unknown[0]!r} is not one of the demo's settings "
                              f"({', '.join(self.settings)})")
        if not self.seeds.seeds:
            return []
        return [s for s in names if not self.seeds.settings or s in self.seeds.settings]

    def setting_list(self) -> dict[str, DemoSetting]:
        out = {}
        for name, s in self.settings.items():
            if s is None:
                continue
            if not isinstance(s, dict):
                raise ConfigError(f"settings.{name}: expected a mapping (data, negatives, world_n) or null")
            out[name] = from_dict(DemoSetting, s, f"settings.{name}")
        if not out:
            raise ConfigError("settings: name at least one pairs set, e.g. {random: {data: world:train}}")
        return out


C = TypeVar("C", bound=MatchingConfig)


def load_matching_config(path: str | Path, overrides: list[str] | None = None, cls: type[C] = MatchingConfig,
                         quick: bool = False) -> C:
    """Read a study config, apply the ``quick`` section (when asked) and then ``key=value`` overrides, validate."""
    data = read_yaml(path)
    if quick:
        extra = data.get("quick")
        if not isinstance(extra, dict) or not extra:
            raise ConfigError(f"{path}: --quick needs a 'quick' section (dotted keys → values) in the config")
        apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in extra.items()])
    apply_overrides(data, list(overrides or []))
    cfg = from_dict(cls, data)
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError("threads must be ≥ 1 (or null for torch's default)")
    try:
        check_device_spec(cfg.device, "device")
    except DeviceError as e:
        raise ConfigError(str(e)) from None
    if isinstance(cfg, DemoConfig):
        cfg.seed_settings()  # also checks the settings
    return cfg
