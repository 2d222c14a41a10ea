"""What a run checks before its first step, so that nothing it could have known fails or misleads after the
compute: every path it will read (a wrong evaluation path must not surface after minutes of training; each
error names the config key that holds the path), settings that are valid but almost surely not meant
(warnings), and evaluation data that is also training data (a warning with counts).

Paths checked: the teacher (model folder, ``open_clip:FOLDER[?tokenizer=T]`` or ``cache:DIR``, each member of an
ensemble), pretrained student towers and tokenizer, ``data.train``, ``data.unpaired`` and every ``eval:`` entry's
data, template file and bias word file. Hub ids and remote shards are checked when they are fetched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmkd.config import RunConfig, teacher_members
from mmkd.data.batches import in_memory
from mmkd.data.overlap import overlap, training_identities
from mmkd.data.paths import check_spec_paths
from mmkd.data.records import Record
from mmkd.data.templates import load_templates
from mmkd.errors import ConfigError, MmkdError
from mmkd.eval.bias import load_bias_words
from mmkd.eval.tasks import DEFAULT_SPLIT, data_format, eval_records, run_eval_name
from mmkd.models.hub import check_model_path
from mmkd.teacher_spec import CacheTeacher, parse_member

CACHE_META = "meta.json"
TOWER_SOURCES = ("teacher", "new")  # every other tower source names a pretrained model


def check_cache_folder(folder: str, key: str) -> None:
    """A ``cache:DIR`` teacher must be a folder ``mmkd cache`` wrote (its meta.json present)."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}: teacher cache {p} not found; build it with `mmkd cache --teacher MODEL --data "
                          f"SPEC --out {p}` or fix the path")
    if not (p / CACHE_META).is_file():
        raise ConfigError(f"{key}: {p} is not a teacher cache (no {CACHE_META}); give the folder `mmkd cache --out` "
                          "wrote")


def check_run_paths(cfg: RunConfig) -> None:
    """Raise ConfigError naming the key of the first path in ``cfg`` that does not exist."""
    members = teacher_members(cfg)
    for i, t in enumerate(members):
        key = "teacher" if len(members) == 1 else f"teacher[{i}]"
        member = parse_member(t)
        if isinstance(member, CacheTeacher):
            check_cache_folder(member.folder, key)
        else:
            check_model_path(member.name, key)
    for tower in ("vision", "text"):
        source = getattr(cfg.student, tower).source
        if source not in TOWER_SOURCES:
            check_model_path(source, f"student.{tower}.source")
    if cfg.student.tokenizer:
        check_model_path(cfg.student.tokenizer, "student.tokenizer")
    check_spec_paths(cfg.data.train, "data.train")
    if cfg.data.unpaired:
        check_spec_paths(cfg.data.unpaired, "data.unpaired")
    for i, spec in enumerate(cfg.eval):
        if spec.data:
            check_spec_paths(spec.data, f"eval[{i}].data")
        try:
            if spec.templates:
                load_templates(spec.templates)
            if spec.words:
                load_bias_words(spec.words)
        except MmkdError as e:
            raise ConfigError(f"eval[{i}]: {e}") from None


def warn(message: str) -> None:
    """A quiet misconfiguration, said once on stderr (the run goes on)."""
    print(f"mmkd: warning: {message}", file=sys.stderr)


def run_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are valid but almost surely not meant: each one a line saying what happens and what to do."""
    out = []
    t = cfg.train
    if t.warmup_steps >= t.steps:
        out.append(f"train.warmup_steps ({t.warmup_steps}) ≥ train.steps ({t.steps}): the learning rate never "
                   f"reaches train.lr ({t.lr:g}) and never decays; lower train.warmup_steps (e.g. {t.steps // 10})")
    return out


CAPTION_SHARE = 0.05  # shared captions alone matter past this share (short generic captions recur in any set)


def eval_overlaps(cfg: RunConfig, train_sets: Sequence[Sequence[Record] | None]) -> dict[str, dict[str, int]]:
    """Warn, with counts, about each ``eval:`` entry whose images (or many captions) are also training data, and
    return ``{eval name: counts}`` for metrics.json (the report marks those scores). Training data streamed from
    shards is not compared (it would be read whole); the built-in world's splits are disjoint by construction."""
    held = [recs for recs in train_sets if recs is not None and in_memory(recs)]
    specs = [(i, s) for i, s in enumerate(cfg.eval) if s.data and data_format(s.data) != "world"]
    if not held or not specs:
        return {}
    train = training_identities([r for recs in held for r in recs])
    out: dict[str, dict[str, Any]] = {}
    for i, spec in specs:
        found = overlap(train, eval_records(spec.data or "", cfg.cache_dir, split=spec.split or DEFAULT_SPLIT,
                                            limit=spec.limit))
        if found.images or found.captions > CAPTION_SHARE * found.of_captions:
            out[run_eval_name(spec)] = found.to_json()
            warn(f"eval[{i}] ({spec.data}): {found.images} of {found.of_images} images and {found.captions} of "
                 f"{found.of_captions} captions are also training data (data.train / data.unpaired), so its scores "
                 "are not held out; evaluate on data the run did not train on")
    return out
