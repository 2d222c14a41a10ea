"""Where the study's teacher comes from: a given model, or a distill config trained once by ``run_distill``.

A teacher trained here goes through the same path a user's ``mmkd distill CONFIG`` takes, into
``CACHE/teacher-<hash of the resolved config>``; a finished run (its ``metrics.json`` written) is reused, an
interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mmkd.config import load_config
from mmkd.config_io import to_dict
from mmkd.errors import ConfigError
from mmkd.studies.matching.config import MatchingConfig


def check_teacher(cfg: MatchingConfig) -> None:
    """A teacher is named: a source, or a distill config to train one (checked before any work)."""
    if not cfg.teacher.source and not cfg.teacher.pretrain:
        raise ConfigError("teacher.source: give a model folder or hub id (or teacher.pretrain: a distill config "
                          "that trains one)")


def teacher_source(cfg: MatchingConfig, log: Any = print) -> Path:
    """The dual encoder (or matching teacher) folder / hub id the study fine-tunes."""
    check_teacher(cfg)
    t = cfg.teacher
    if t.source:
        return Path(t.source)
    run = load_config(t.pretrain, [f"cache_dir={cfg.cache}", f"train.device={cfg.device}", *t.pretrain_overrides])
    settings = {k: v for k, v in to_dict(run).items() if k != "out"}
    settings["train"] = {k: v for k, v in settings["train"].items() if k != "device"}  # the same teacher anywhere
    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = cfg.cache / f"teacher-{key}"
    run.out = str(out)
    if (out / "metrics.json").is_file() and (out / "student").is_dir():
        log(f"teacher: reusing {out / 'student'} (trained from {t.pretrain})")
        return out / "student"
    from mmkd.pipeline import run_distill

    log(f"teacher: training {t.pretrain} once into {out} (mmkd distill's path)")
    run_distill(run, resume=(out / "checkpoints").is_dir(), log=log)
    return out / "student"
