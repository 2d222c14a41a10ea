"""``mmkd distill CONFIG``: one distillation run from a YAML config (teacher, data, student, objectives)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mmkd.config import RunConfig, to_dict
from mmkd.data.resolve import records_from_spec, zeroshot_classes
from mmkd.eval.runner import eval_records
from mmkd.eval.suite import retrieval, world_labels, zeroshot
from mmkd.models.hub import load_dual_encoder, save_dual_encoder
from mmkd.models.student import build_student, tower_widths
from mmkd.objectives.base import ObjectiveContext, build_objectives
from mmkd.teacher.targets import OnlineTeacher, precompute
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


def run_distill(cfg: RunConfig, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Load teacher, build student, train with the configured objectives, save, evaluate."""
    info: DistInfo = init_distributed()
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if not cfg.teacher:
        raise ValueError("config key 'teacher' is empty: give a model folder or hub id")
    teacher = load_dual_encoder(cfg.teacher)
    student = build_student(teacher, cfg.student)
    paired = _records(cfg, cfg.data.train, cfg.data.limit, cfg.data.world_size_train)
    unpaired = (_records(cfg, cfg.data.unpaired, cfg.data.unpaired_limit, cfg.data.world_size_unpaired)
                if cfg.data.unpaired else None)
    if unpaired is not None:
        from dataclasses import replace

        unpaired = [replace(r, captions=()) for r in unpaired]
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
    data = TrainData(s_paired, s_unpaired, cfg.data.batch_size, cfg.data.unpaired_batch_size,
                     world=info.world_size, seed=cfg.train.seed)
    targets = None
    if objectives.needs_teacher:
        wants_features = any(getattr(o, "level", "embeds") == "features" for o in objectives.objectives)
        online = OnlineTeacher(teacher, t_paired, t_unpaired, features=wants_features)
        if cfg.data.augment:
            targets = online  # augmented views differ every step: the teacher must see the same view
        else:
            log("computing teacher targets once (no augmentation: every step reuses them)")
            banks = [b for b in (t_paired, t_unpaired) if b is not None]
            targets = precompute(online, banks, [c for r in paired for c in r.captions])
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
