"""``mmkd distill CONFIG``: one distillation run from a YAML config: `prepare` builds it (teacher, data, student,
objectives), `train` trains it, and the student is saved, evaluated and recorded in ``metrics.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from mmkd.config import RunConfig
from mmkd.config_io import to_dict
from mmkd.devices import resolve_device
from mmkd.dist import DistInfo, barrier, init_distributed
from mmkd.eval.perimage import write_per_image
from mmkd.eval.tasks import check_specs as check_eval_specs
from mmkd.eval.tasks import evaluate, run_eval_name
from mmkd.fileio import atomic_write_json, atomic_write_text
from mmkd.models.hub import save_dual_encoder
from mmkd.objectives.base import check_specs
from mmkd.preflight import check_run_paths, eval_overlaps, run_warnings, warn
from mmkd.run_setup import RunSetup, TargetCache, prepare
from mmkd.train.loop import Curve, train
from mmkd.train.runfolder import RunFolder, RunIdentity, plan_start, run_config


def run_eval_specs(model: Any, cfg: RunConfig, per_image: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's ``eval:`` list scored on ``model`` (the student, or a sweep's teacher row); per_image receives
    each zero-shot entry's per-image top-1 correctness (see ``mmkd.eval.perimage``)."""
    return evaluate(model, cfg.eval, cache_dir=cfg.cache_dir, per_image=per_image)


def run_distill(cfg: RunConfig, resume: bool | str = False, log: Any = print, *, overwrite: bool = False,
                info: DistInfo | None = None, cache: TargetCache | None = None, progress: bool = True,
                curve: Callable[[Any], dict[str, Any]] | None = None, curve_every: int = 0
                ) -> dict[str, Any]:
    """Load the teacher (or open its cache, or run without one), build the student, train, save, evaluate.

    resume: False/"no" starts a run (refusing a folder that holds another run), True/"yes" continues the
    newest checkpoint (refusing a folder without one or a checkpoint of another config), "auto" continues
    when there is a checkpoint and starts otherwise. overwrite: move a run already in ``cfg.out`` aside
    (to ``OUT.old-<time>``) once this one has started. info: the process group (default: join torchrun's, or
    none); cache: teachers/targets shared across runs; curve(student), curve_every: evaluations during
    training (`train`: logged to metrics.jsonl, their time left out of the training clock). The run folder is
    locked (one writer) by rank 0.
    """
    check_specs(cfg.objectives)  # unknown objectives fail before any model is loaded
    check_eval_specs(cfg.eval)  # and unknown evaluation kinds before training, not after
    check_run_paths(cfg)  # and every path the run will read (evaluation data included), naming its key
    device = resolve_device(cfg.train.device, "train.device", info.local_rank if info else None)
    info = info or init_distributed(device)
    for message in run_warnings(cfg) if info.is_main else []:
        warn(message)
    mode = ("yes" if resume else "no") if isinstance(resume, bool) else str(resume)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # before the teacher targets and the evaluation, not only training
    out = Path(cfg.out)
    folder = RunFolder(out, info.is_main)
    try:
        plan = plan_start(out, cfg, mode, overwrite) if info.is_main else "follow"
        run = prepare(cfg, info, log, cache, device)
        bad = run.skipped
        if bad.count and info.is_main:
            log(f"data.on_error: skip: left out {bad.count} bad sample(s); first: {bad.skipped[0]}")
        identity = RunIdentity(run_config(cfg), run.fingerprints)
        data = run.data
        overlaps = (eval_overlaps(cfg, [data.paired.records, data.unpaired.records if data.unpaired else None])
                    if info.is_main else {})

        def on_start(step: int) -> None:
            if not info.is_main:
                return
            if plan == "replace":
                log(f"the run that was in {out} is kept whole in {folder.replace()}")
            atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            folder.started = True
            if step:
                log(f"resuming run {identity.run_id[:8]} from step {step} ({out / 'checkpoints'})")

        result = train(run.student, run.objectives, data, run.targets, cfg.train, out, info,
                       resume=plan == "resume", desc="distill", progress=progress, identity=identity,
                       on_start=on_start, device=device, workers=cfg.data.workers,
                       curve=Curve(curve, curve_every) if curve is not None and curve_every else None)
        kept = finished_record(out, identity, result.steps) if result.resumed_from >= result.steps else None
        if kept is not None and sorted(kept.get("eval") or {}) == sorted(map(run_eval_name, cfg.eval)):
            # a finished run resumed: nothing trained, nothing new to evaluate, so its record stays as it was
            if info.is_main:
                log(f"the run in {out} had already finished its {result.steps} steps; its metrics.json is kept")
            return kept
        loss = result.final_loss if math.isfinite(result.final_loss) else None  # None: no step ran here
        train_record = {"steps": result.steps, "seconds": round(result.seconds, 1), "final_loss": loss,
                        "resumed_from": result.resumed_from}
        metrics: dict[str, Any] = {"train": kept["train"] if kept is not None else train_record,  # (eval: changed)
                                   "data": {"on_error": cfg.data.on_error, "skipped": bad.count}}
        if info.is_main:
            _save(cfg, run, identity, overlaps, metrics, log)
    finally:
        folder.close()
    barrier()
    return metrics


def _save(cfg: RunConfig, run: RunSetup, identity: RunIdentity, overlaps: dict[str, Any], metrics: dict[str, Any],
          log: Any) -> None:
    """Rank 0's end of a run: the student saved, evaluated (``metrics``' eval), then metrics.json written."""
    out = Path(cfg.out)
    save_dual_encoder(run.student, out / "student")
    if cfg.eval:
        per_image: dict[str, Any] = {}
        metrics["eval"] = run_eval_specs(run.student, cfg, per_image)
        write_per_image(out, per_image)  # before metrics.json, which marks the run finished
        if overlaps:
            metrics["eval_overlap"] = overlaps  # these scores are not held out (the report marks them)
    plain = identity.to_plain()
    metrics["run"] = {k: plain[k] for k in ("run_id", "config_sha256", "fingerprints")}
    atomic_write_json(out / "metrics.json", metrics)  # metrics.json marks a finished run
    log(f"student saved to {out / 'student'}")


def finished_record(out: Path, identity: RunIdentity, steps: int) -> dict[str, Any] | None:
    """The metrics.json of this very run (same run id) when it finished ``steps`` steps, else None."""
    try:
        record = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    same = (isinstance(record, dict) and (record.get("run") or {}).get("run_id") == identity.run_id
            and (record.get("train") or {}).get("steps") == steps)
    return record if same else None
