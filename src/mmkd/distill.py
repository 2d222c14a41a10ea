"""``mmkd distill CONFIG``: one distillation run from a YAML config (teacher, data, student, objectives)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mmkd.config import RunConfig, to_dict
from mmkd.data.records import Record
from mmkd.data.resolve import records_from_spec, zeroshot_classes
from mmkd.eval.runner import eval_records
from mmkd.eval.suite import retrieval, world_labels, zeroshot
from mmkd.models.hub import load_dual_encoder, save_dual_encoder
from mmkd.models.student import build_student, tower_widths
from mmkd.objectives.base import ObjectiveContext, WeightedSum, build_objectives
from mmkd.teacher.cache import CachedTeacher, CacheExpectation, arrays_needed
from mmkd.teacher.targets import OnlineTeacher, Targets, precompute
from mmkd.train.batches import ImageBank, TrainData
from mmkd.train.distributed import DistInfo, barrier, init_distributed
from mmkd.train.loop import train


def _records(cfg: RunConfig, spec: str, limit: int | None, n_world: int) -> list:
    recs = records_from_spec(spec, cfg.cache_dir, world_n=n_world)
    return recs[:limit] if limit else recs


def run_eval_specs(model: Any, cfg: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in cfg.eval:
        records = eval_records(spec.data, cfg.cache_dir, world_n=2000, split="test")  # CIFAR/STL: test split
        name = spec.name or (f"{spec.kind}:{spec.data}" + (f":{spec.class_set}" if spec.class_set else ""))
        if spec.kind == "zeroshot":
            names, templates = zeroshot_classes(spec.data, spec.class_set, split="test")
            labels = (world_labels(records, spec.class_set or "colour_shape") if spec.data.startswith("world:")
                      else None)
            out[name] = zeroshot(model, records, names, templates, labels)
        elif spec.kind == "retrieval":
            out[name] = retrieval(model, records)
        else:
            raise ValueError(f"eval kind {spec.kind!r} unknown; valid: zeroshot, retrieval")
    return out


ONLINE_VIEWS = 1 << 30  # an online teacher sees any view: augmented views are then fresh at every step


def training_records(cfg: RunConfig) -> tuple[list[Record], list[Record] | None]:
    """The captioned training records and the uncaptioned (unpaired) ones a config names, as distill reads them."""
    paired = _records(cfg, cfg.data.train, cfg.data.limit, cfg.data.world_size_train)
    unpaired = (_records(cfg, cfg.data.unpaired, cfg.data.unpaired_limit, cfg.data.world_size_unpaired)
                if cfg.data.unpaired else None)
    if unpaired is not None:
        unpaired = [replace(r, captions=()) for r in unpaired]
    return paired, unpaired or None


def cache_path(teacher: str) -> str | None:
    """The folder of ``teacher: cache:DIR``, or None for a model."""
    return teacher[len("cache:"):] if teacher.startswith("cache:") else None


def wants_features(objectives: WeightedSum) -> bool:
    return any(getattr(o, "level", "embeds") == "features" for o in objectives.objectives)


def run_distill(cfg: RunConfig, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Load teacher (or open its cache), build student, train with the configured objectives, save, evaluate."""
    info: DistInfo = init_distributed()
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if not cfg.teacher:
        raise ValueError("config key 'teacher' is empty: give a model folder or hub id, or cache:DIR")
    cached = cache_path(cfg.teacher)
    if cached is not None:
        data, targets, student, objectives = _cached_setup(cfg, cached, info, log)
    else:
        data, targets, student, objectives = _online_setup(cfg, info, log)
    result = train(student, objectives, data, targets, cfg.train, out, info, resume=resume, desc="distill")
    metrics: dict[str, Any] = {"train": {"steps": result.steps, "seconds": round(result.seconds, 1),
                                         "final_loss": result.final_loss}}
    if info.is_main:
        save_dual_encoder(student, out / "student")
        if cfg.eval:
            metrics["eval"] = run_eval_specs(student, cfg)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"student saved to {out / 'student'}")
    barrier()
    return metrics


def _online_setup(cfg: RunConfig, info: DistInfo, log: Any) -> tuple[TrainData, Targets | None, Any, WeightedSum]:
    teacher = load_dual_encoder(cfg.teacher)
    student = build_student(teacher, cfg.student)
    paired, unpaired = training_records(cfg)
    sm, tm = student.meta, teacher.meta
    s_paired = ImageBank(paired, sm.image_size, sm.image_mean, sm.image_std, cfg.data.augment, cfg.train.seed)
    s_unpaired = (ImageBank(unpaired, sm.image_size, sm.image_mean, sm.image_std, cfg.data.augment, cfg.train.seed)
                  if unpaired else None)
    t_paired = ImageBank(paired, tm.image_size, tm.image_mean, tm.image_std, cfg.data.augment, cfg.train.seed)
    t_unpaired = (ImageBank(unpaired, tm.image_size, tm.image_mean, tm.image_std, cfg.data.augment,
                            cfg.train.seed) if unpaired else None)
    ctx = ObjectiveContext(student.projection_dim, teacher.projection_dim, tower_widths(student),
                           tower_widths(teacher))
    objectives = build_objectives(cfg.objectives, ctx)
    views = cfg.data.views or (ONLINE_VIEWS if cfg.data.augment else 1)
    data = TrainData(s_paired, s_unpaired, cfg.data.batch_size, cfg.data.unpaired_batch_size,
                     world=info.world_size, seed=cfg.train.seed, views=views)
    targets: Targets | None = None
    if objectives.needs_teacher:
        online = OnlineTeacher(teacher, t_paired, t_unpaired, features=wants_features(objectives))
        if cfg.data.augment:
            targets = online  # augmented views differ every step: the teacher must see the same view
        else:
            log("computing teacher targets once (no augmentation: every step reuses them)")
            banks = [b for b in (t_paired, t_unpaired) if b is not None]
            targets = precompute(online, banks, [c for r in paired for c in r.captions])
    return data, targets, student, objectives


def _cached_setup(cfg: RunConfig, folder: str, info: DistInfo, log: Any
                  ) -> tuple[TrainData, Targets | None, Any, WeightedSum]:
    """Train from a teacher cache: the teacher is never loaded; targets are read by key at the replayed view."""
    cache = CachedTeacher.open(folder)
    student = build_student(cache.teacher_info(), cfg.student)
    paired, unpaired = training_records(cfg)
    sm = student.meta
    s_paired = cache.bank(paired, sm.image_size, sm.image_mean, sm.image_std, augment=cfg.data.augment)
    s_unpaired = (cache.bank(unpaired, sm.image_size, sm.image_mean, sm.image_std, augment=cfg.data.augment)
                  if unpaired else None)
    ctx = ObjectiveContext(student.projection_dim, cache.embed_dim, tower_widths(student), cache.feature_dims)
    objectives = build_objectives(cfg.objectives, ctx)
    views = cfg.data.views or (cache.views if cfg.data.augment else 1)
    data = TrainData(s_paired, s_unpaired, cfg.data.batch_size, cfg.data.unpaired_batch_size,
                     world=info.world_size, seed=cfg.train.seed, views=views)
    if not objectives.needs_teacher:
        return data, None, student, objectives
    expect = CacheExpectation.for_data(data, arrays=arrays_needed(objectives),
                                       ignore_fingerprint=cfg.train.ignore_cache_fingerprint)
    cache.check(expect)
    if info.is_main:
        log(f"teacher targets from the cache {folder}: {cache.layout.n_samples} samples × {cache.views} view(s); "
            f"training draws views 0..{views - 1}")
    return data, cache, student, objectives
