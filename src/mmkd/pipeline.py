"""``mmkd distill CONFIG``: one distillation run from a YAML config (teacher, data, student, objectives).

The teacher may be a dual encoder (``teacher_modality: image_text``), an image model only
(``teacher_modality: image``, the unimodal-teacher recipe), or absent when every objective is a task loss
(training from scratch, which is also how mmkd trains a teacher of its own).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mmkd.config import ConfigError, RunConfig, teacher_members, to_dict
from mmkd.data.batches import ImageBank, TrainData, in_memory
from mmkd.data.records import BadSamples, DataError, Record
from mmkd.data.resolve import records_from_spec, zeroshot_classes
from mmkd.data.transforms import with_randaugment
from mmkd.devices import resolve_device
from mmkd.dist import DistInfo, barrier, init_distributed
from mmkd.eval.perimage import write_per_image
from mmkd.eval.tasks import check_specs as check_eval_specs
from mmkd.eval.tasks import evaluate, run_eval_name
from mmkd.fileio import atomic_write_json, atomic_write_text
from mmkd.models.hub import load_dual_encoder, save_dual_encoder
from mmkd.models.student import build_student, feature_widths
from mmkd.models.towers import tower_width
from mmkd.objectives.base import ObjectiveContext, WeightedSum, build_objectives, check_specs
from mmkd.preflight import check_run_paths, eval_overlaps, run_warnings, warn
from mmkd.teacher.cache import CachedTeacher, CacheError, CacheExpectation, arrays_needed
from mmkd.teacher.ensemble import EnsembleLookup, EnsembleTargets, check_agreement
from mmkd.teacher.fingerprint import state_dict_sha256
from mmkd.teacher.targets import OnlineTeacher, TableTeacher, Targets, precompute
from mmkd.teacher.unimodal import ImageTeacher, load_image_teacher
from mmkd.train.loop import Curve, train
from mmkd.train.runfolder import RunFolder, RunIdentity, data_fingerprint, plan_start, run_config


def label_captions(records: Sequence[Record], spec: str, template: str) -> Sequence[Record]:
    """Give labelled, uncaptioned records the caption ``template.format(class name)`` (CLIP's class prompts)."""
    names, _ = zeroshot_classes(spec)

    def caption(r: Record) -> Record:
        if r.captions:
            return r
        if r.label is None:
            raise DataError(f"{r.origin or r.key}: data.label_captions needs a class label on every uncaptioned "
                            "image; this one has none")
        if not 0 <= r.label < len(names):
            raise DataError(f"{r.origin or r.key}: label {r.label} is out of range: {spec} has {len(names)} classes "
                            f"(labels 0..{len(names) - 1}); fix the label or the class list")
        return replace(r, captions=(template.format(names[r.label]),))

    return rewrite(records, caption)


def rewrite(records: Sequence[Record], fn: Callable[[Record], Record]) -> Sequence[Record]:
    """``fn`` applied to every record: at once for records in memory, as each is read for sharded ones."""
    return [fn(r) for r in records] if in_memory(records) else records.map(fn)  # type: ignore[attr-defined]


def _records(cfg: RunConfig, spec: str, limit: int | None, n_world: int, bad: BadSamples | None = None
             ) -> Sequence[Record]:
    if cfg.data.label_captions:  # class names known (a classes.txt beside remote shards too) before any shard is read
        try:
            zeroshot_classes(spec)
        except DataError as e:
            raise ConfigError(f"data.label_captions: {e}; for shards behind a URL, classes.txt at the same URL "
                              "folder is read") from None
    recs = records_from_spec(spec, cfg.cache_dir, world_n=n_world, bad=bad, stream=True)
    store = getattr(recs, "store", None)
    if store is not None:  # fetched shards kept on disk: the current window and the next, whatever its size
        store.max_cached = store.max_open = max(store.max_cached, 2 * cfg.data.shard_window)
    recs = recs[:limit] if limit else recs
    if cfg.data.label_captions:
        recs = label_captions(recs, spec, cfg.data.label_captions)
    if cfg.data.captions_per_image:
        keep = cfg.data.captions_per_image
        recs = rewrite(recs, lambda r: replace(r, captions=r.captions[:keep]))
    return recs


def data_print(paired: Sequence[Record], unpaired: Sequence[Record] | None) -> dict[str, Any]:
    """The run identity's data fingerprint: record digests for data in memory, the shard index for shards
    (names, sizes, counts: computed without reading a sample)."""
    if in_memory(paired) and (unpaired is None or in_memory(unpaired)):
        return data_fingerprint(list(paired), list(unpaired) if unpaired is not None else None)
    out = {}
    for name, recs in (("paired", paired), ("unpaired", unpaired if unpaired is not None else [])):
        out[name] = (data_fingerprint(list(recs), None)["paired"] if in_memory(recs)
                     else recs.fingerprint())  # type: ignore[attr-defined]
    return out


def load_teacher(cfg: RunConfig) -> Any:
    """The configured teacher: a dual encoder, an image-only model, or None (no teacher)."""
    if not cfg.teacher:
        return None
    if cfg.teacher_modality == "image":
        return load_image_teacher(cfg.teacher)
    return load_dual_encoder(cfg.teacher)


def teacher_fingerprint(teacher: Any) -> str | None:
    """SHA-256 of the teacher's weights (None without a teacher): a resume must use the same teacher."""
    return state_dict_sha256(teacher) if teacher is not None else None


def teacher_context(student: Any, teacher: Any) -> ObjectiveContext:
    sig = {"student_logit_bias": getattr(student, "logit_bias", None) is not None}
    if teacher is None:
        return ObjectiveContext(student.projection_dim, None, feature_widths(student), {}, **sig)
    if isinstance(teacher, ImageTeacher):
        return ObjectiveContext(student.projection_dim, None, feature_widths(student),
                                {"image": tower_width(teacher.vision_model)}, **sig)
    bias = getattr(teacher, "logit_bias", None)
    if isinstance(bias, torch.Tensor):  # a SigLIP teacher: the siglip objective starts from (or distils) its logits
        sig.update(teacher_logit_bias=float(bias.detach()),
                   teacher_logit_scale=float(teacher.logit_scale.detach().float().exp()))
    return ObjectiveContext(student.projection_dim, teacher.projection_dim, feature_widths(student),
                            feature_widths(teacher), **sig)


class TargetCache:
    """Teachers and their targets computed once, shared by every run that uses the same teacher and data.

    ``mmkd sweep`` keeps one for all its runs, so the teacher runs once per sweep, not once per run.
    """

    def __init__(self) -> None:
        self.teachers: dict[Hashable, Any] = {}
        self.tables: dict[Hashable, TableTeacher] = {}
        self.fingerprints: dict[Hashable, str | None] = {}

    def teacher(self, cfg: RunConfig) -> Any:
        key = (cfg.teacher, cfg.teacher_modality)
        if key not in self.teachers:
            self.teachers[key] = load_teacher(cfg)
        return self.teachers[key]

    def fingerprint(self, cfg: RunConfig, teacher: Any) -> str | None:
        key = (cfg.teacher, cfg.teacher_modality)
        if key not in self.fingerprints:
            self.fingerprints[key] = teacher_fingerprint(teacher)
        return self.fingerprints[key]

    def table(self, key: Hashable, compute: Callable[[], TableTeacher]) -> TableTeacher:
        if key not in self.tables:
            self.tables[key] = compute()
        return self.tables[key]


def _targets_key(cfg: RunConfig) -> Hashable:
    d = cfg.data
    return (cfg.teacher, cfg.teacher_modality, os.path.abspath(cfg.cache_dir), d.train, d.limit, d.unpaired,
            d.unpaired_limit, d.world_size_train, d.world_size_unpaired, d.label_captions, d.captions_per_image)


def run_eval_specs(model: Any, cfg: RunConfig, per_image: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's ``eval:`` list scored on ``model`` (the student, or a sweep's teacher row); per_image receives
    each zero-shot entry's per-image top-1 correctness (see ``mmkd.eval.perimage``)."""
    return evaluate(model, cfg.eval, cache_dir=cfg.cache_dir, per_image=per_image)


ONLINE_VIEWS = 1 << 30  # an online teacher sees any view: augmented views are then fresh at every step


def training_records(cfg: RunConfig, bad: BadSamples | None = None
                     ) -> tuple[Sequence[Record], Sequence[Record] | None]:
    """The captioned training records and the uncaptioned (unpaired) ones a config names, as distill reads them.

    bad: collects the samples left out under ``data.on_error: skip`` (default: ``cfg.data.on_error``, uncounted)."""
    bad = bad or BadSamples(cfg.data.on_error)
    paired = _records(cfg, cfg.data.train, cfg.data.limit, cfg.data.world_size_train, bad)
    unpaired = (_records(cfg, cfg.data.unpaired, cfg.data.unpaired_limit, cfg.data.world_size_unpaired, bad)
                if cfg.data.unpaired else None)
    if unpaired is not None:
        unpaired = rewrite(unpaired, lambda r: replace(r, captions=()))
    return paired, unpaired if unpaired is not None and len(unpaired) else None


def augment_paired(cfg: RunConfig) -> bool:
    """Whether the captioned images are augmented (``data.augment`` unless ``data.augment_paired: false``)."""
    return cfg.data.augment and cfg.data.augment_paired


def cache_path(teacher: str | list[str]) -> str | None:
    """The folder of ``teacher: cache:DIR`` (of the first member of an ensemble), or None for a model (or no
    teacher)."""
    first = teacher[0] if isinstance(teacher, list) else teacher
    return first[len("cache:"):] if first.startswith("cache:") else None


def member_configs(cfg: RunConfig) -> list[RunConfig]:
    """One single-teacher config per member of ``cfg``'s teacher (itself for one teacher or none)."""
    members = teacher_members(cfg)
    return [cfg] if len(members) < 2 else [replace(cfg, teacher=t) for t in members]


def wants_features(objectives: WeightedSum) -> bool:
    """Whether any objective reads the teacher's pooled pre-projection features (not only its embeddings)."""
    return any(o.teacher_features for o in objectives.objectives)


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
        bad = BadSamples(cfg.data.on_error)
        if cache_path(cfg.teacher) is not None:
            folders = [str(cache_path(t)) for t in teacher_members(cfg)]
            data, targets, student, objectives, prints = _cached_setup(cfg, folders, info, log, bad)
        else:
            data, targets, student, objectives, prints = _online_setup(cfg, info, log, cache, bad, device)
        if bad.count and info.is_main:
            log(f"data.on_error: skip: left out {bad.count} bad sample(s); first: {bad.skipped[0]}")
        prints["data"] = data_print(data.paired.records, data.unpaired.records if data.unpaired else None)
        identity = RunIdentity(run_config(cfg), prints)
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

        result = train(student, objectives, data, targets, cfg.train, out, info, resume=plan == "resume",
                       desc="distill", progress=progress, identity=identity, on_start=on_start, device=device,
                       workers=cfg.data.workers,
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
            save_dual_encoder(student, out / "student")
            if cfg.eval:
                per_image: dict[str, Any] = {}
                metrics["eval"] = run_eval_specs(student, cfg, per_image)
                write_per_image(out, per_image)  # before metrics.json, which marks the run finished
                if overlaps:
                    metrics["eval_overlap"] = overlaps  # these scores are not held out (the report marks them)
            run = identity.to_plain()
            metrics["run"] = {k: run[k] for k in ("run_id", "config_sha256", "fingerprints")}
            atomic_write_json(out / "metrics.json", metrics)  # metrics.json marks a finished run
            log(f"student saved to {out / 'student'}")
    finally:
        folder.close()
    barrier()
    return metrics


def finished_record(out: Path, identity: RunIdentity, steps: int) -> dict[str, Any] | None:
    """The metrics.json of this very run (same run id) when it finished ``steps`` steps, else None."""
    try:
        record = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    same = (isinstance(record, dict) and (record.get("run") or {}).get("run_id") == identity.run_id
            and (record.get("train") or {}).get("steps") == steps)
    return record if same else None


def _online_setup(cfg: RunConfig, info: DistInfo, log: Any, cache: TargetCache | None, bad: BadSamples | None = None,
                  device: torch.device | None = None
                  ) -> tuple[TrainData, Targets | None, Any, WeightedSum, dict[str, Any]]:
    """A loaded teacher (dual encoder or image-only; or each of an ensemble's) runs per batch or once up front, on
    ``device`` (the training device); or there is no teacher. The student is built from the (first) teacher."""
    members = member_configs(cfg)
    teachers = [cache.teacher(m) if cache is not None else load_teacher(m) for m in members]
    teacher = teachers[0]
    student = build_student(teacher, cfg.student, seed=cfg.train.seed)
    contexts = [teacher_context(student, t) for t in teachers]
    objectives = build_objectives(cfg.objectives, contexts if len(contexts) > 1 else contexts[0], seed=cfg.train.seed)
    if objectives.needs_teacher and teacher is None:
        needy = sorted({n for n, o in zip(objectives.names, objectives.objectives) if o.uses_teacher})
        raise ConfigError(f"objectives {needy} distil from a teacher, but config key 'teacher' is empty: give a "
                          "model folder or hub id (or cache:DIR), or keep only task objectives "
                          "(clip, triplet, siglip)")
    paired, unpaired = training_records(cfg, bad)
    sm = student.meta
    aug = with_randaugment(None, cfg.data.randaugment)  # the teacher's banks below: the same views
    s_paired = ImageBank(paired, sm.image_size, sm.image_mean, sm.image_std, augment_paired(cfg), cfg.train.seed, aug)
    s_unpaired = (ImageBank(unpaired, sm.image_size, sm.image_mean, sm.image_std, cfg.data.augment, cfg.train.seed,
                            aug) if unpaired else None)
    views = cfg.data.views or (ONLINE_VIEWS if cfg.data.augment else 1)
    data = TrainData(s_paired, s_unpaired, cfg.data.batch_size, cfg.data.unpaired_batch_size,
                     world=info.world_size, seed=cfg.train.seed, views=views, window=cfg.data.shard_window)
    targets: Targets | None = None
    if objectives.needs_teacher:
        parts = [_online_targets(m, t, paired, unpaired, data, objectives, cache, device, log, aug)
                 for m, t in zip(members, teachers)]
        targets = parts[0][0] if len(parts) == 1 else _online_ensemble(members, parts, data)
    fingerprints = [cache.fingerprint(m, t) if cache is not None else teacher_fingerprint(t)
                    for m, t in zip(members, teachers)]
    prints = {"teacher": fingerprints[0] if len(fingerprints) == 1 else fingerprints}
    return data, targets, student, objectives, prints


def _online_targets(cfg: RunConfig, teacher: Any, paired: Sequence[Record], unpaired: Sequence[Record] | None,
                    data: TrainData, objectives: WeightedSum, cache: TargetCache | None,
                    device: torch.device | None, log: Any, aug: dict[str, Any] | None = None
                    ) -> tuple[Targets, tuple[ImageBank, ImageBank | None]]:
    """One teacher's targets (run per batch, or tabled once) and its image banks; ``cfg`` names that teacher.
    aug: the student's augmentation settings (RandAugment), so the teacher sees the same views."""
    teacher.to(device or "cpu")
    tm = teacher.meta
    t_paired = ImageBank(paired, tm.image_size, tm.image_mean, tm.image_std, augment_paired(cfg), cfg.train.seed,
                         aug)
    t_unpaired = (ImageBank(unpaired, tm.image_size, tm.image_mean, tm.image_std, cfg.data.augment,
                            cfg.train.seed, aug) if unpaired else None)
    # a shared cache computes features too, so every run of a sweep can use the same table
    online = OnlineTeacher(teacher, t_paired, t_unpaired, features=cache is not None or wants_features(objectives))
    if cfg.data.augment or data.streaming:
        # augmented views differ every step: the teacher must see the same view; and a table over streamed
        # shards would be O(samples): the teacher's pixels are decoded with the student's, in the workers
        if data.teacher_banks is None:  # the first teacher's pixels ride with the batch
            data.teacher_banks = (t_paired, t_unpaired)
        return online, (t_paired, t_unpaired)

    def compute() -> TableTeacher:
        log(f"computing teacher targets once for {cfg.teacher} (no augmentation: every step reuses them)")
        banks = [b for b in (t_paired, t_unpaired) if b is not None]
        return precompute(online, banks, [c for r in paired for c in r.captions])

    table = cache.table(_targets_key(cfg), compute) if cache is not None else compute()
    return table.to(device or "cpu"), (t_paired, t_unpaired)


def _online_ensemble(members: list[RunConfig], parts: list[tuple[Targets, tuple[ImageBank, ImageBank | None]]],
                     data: TrainData) -> EnsembleTargets:
    """The members' targets together; a member whose pixels differ from the first's (size, normalisation)
    decodes its own, which streamed shards cannot do (their records are read once, for the batch)."""
    first = parts[0][1][0]
    own = [not (b.eval_tf.cfg.image_size == first.eval_tf.cfg.image_size and b.same_normalization(first))
           for _, (b, _) in parts]
    if data.teacher_banks is not None and data.streaming and any(own):
        i = own.index(True)
        raise ConfigError(f"teacher[{i}] ({members[i].teacher}) takes other pixels (image size or normalisation) "
                          f"than teacher[0] ({members[0].teacher}), and streamed training data decodes one teacher "
                          "resolution per batch: build a teacher cache of each (`mmkd cache`) and list the caches")
    return EnsembleTargets([t for t, _ in parts], own if data.teacher_banks is not None else None)


def cache_context(student: Any, cache: CachedTeacher) -> ObjectiveContext:
    """What the objectives need to know of a cached teacher (its widths; a SigLIP teacher's scale and bias)."""
    t_bias = cache.meta["fingerprint"]["teacher"].get("logit_bias")  # a SigLIP teacher's (None for others)
    return ObjectiveContext(student.projection_dim, cache.embed_dim, feature_widths(student), cache.feature_dims,
                            teacher_logit_scale=cache.logit_scale if t_bias is not None else None,
                            teacher_logit_bias=t_bias,
                            student_logit_bias=getattr(student, "logit_bias", None) is not None)


def _use_synthetic(cfg: RunConfig, caches: Sequence[CachedTeacher], data: TrainData, arrays: Sequence[str]) -> None:
    """data.synthetic_captions: draw one of each image's cached synthetic captions per step (an ensemble's caches
    must hold the same captions: the first cache's are drawn, each cache gives its teacher's targets of them)."""
    from mmkd.teacher.cache.synthetic import SyntheticCaptions, check_same_captions

    syn = cfg.data.synthetic_captions
    try:
        data.synthetic = SyntheticCaptions(caches[0], cfg.train.seed, unpaired=syn.unpaired, weight=syn.weight)
        for other in caches[1:]:
            SyntheticCaptions(other, cfg.train.seed)  # (each cache must hold synthetic captions)
            check_same_captions(caches[0], other)
    except CacheError as e:
        raise ConfigError(f"data.synthetic_captions: {e}") from None
    for c in caches:
        if "text_features" in arrays and "syncap_features" not in c.arrays:
            raise ConfigError(f"data.synthetic_captions: the teacher cache {c.root} holds no pooled features of its "
                              "synthetic captions, which an objective reads: rebuild it with --features")




def _cached_setup(cfg: RunConfig, folders: list[str], info: DistInfo, log: Any, bad: BadSamples | None = None
                  ) -> tuple[TrainData, Targets | None, Any, WeightedSum, dict[str, Any]]:
    """Train from a teacher cache (or an ensemble's caches, which must replay the same views): no teacher is
    loaded; targets are read by key at the replayed view. The student is built from the first cache's teacher."""
    caches = [CachedTeacher.open(f) for f in folders]
    check_agreement(caches)
    cache, folder = caches[0], folders[0]
    student = build_student(cache.teacher_info(), cfg.student, seed=cfg.train.seed)
    paired, unpaired = training_records(cfg, bad)
    if cfg.data.only_cached_shards:  # a partly built cache: train on the shards it holds, and say which are left out
        paired, lacking = cache.restrict(paired)
        unpaired, lacking_unpaired = cache.restrict(unpaired or [])
        lacking = list(dict.fromkeys(lacking + lacking_unpaired))
        if not paired:
            raise ConfigError(f"data.only_cached_shards: the teacher cache {folder} holds none of the training "
                              "data's shards; build it with `mmkd cache` first")
        if lacking and info.is_main:
            log(f"data.only_cached_shards: training on the {len(cache.shards)} shard(s) the teacher cache holds; "
                f"left out {len(lacking)} shard(s) it lacks, e.g. {lacking[0]}")
        unpaired = unpaired or None
    sm = student.meta
    # the cache's crops, training's RandAugment: a cache built with other RandAugment settings is refused by check()
    aug = with_randaugment(cache.augmentation, cfg.data.randaugment)
    s_paired = cache.bank(paired, sm.image_size, sm.image_mean, sm.image_std, augment=augment_paired(cfg),
                          augmentation=aug)
    s_unpaired = (cache.bank(unpaired, sm.image_size, sm.image_mean, sm.image_std, augment=cfg.data.augment,
                             augmentation=aug) if unpaired else None)
    contexts = [cache_context(student, c) for c in caches]
    objectives = build_objectives(cfg.objectives, contexts if len(contexts) > 1 else contexts[0], seed=cfg.train.seed)
    views = cfg.data.views or (cache.views if cfg.data.augment else 1)
    data = TrainData(s_paired, s_unpaired, cfg.data.batch_size, cfg.data.unpaired_batch_size,
                     world=info.world_size, seed=cfg.train.seed, views=views, window=cfg.data.shard_window)
    t_prints = [c.meta["fingerprint"]["teacher"].get("weights_sha256") for c in caches]
    c_prints = [hashlib.sha256(json.dumps(c.meta["fingerprint"], sort_keys=True).encode()).hexdigest() for c in caches]
    prints = ({"teacher": t_prints[0], "cache": c_prints[0]} if len(caches) == 1
              else {"teacher": t_prints, "cache": c_prints})
    if cfg.data.synthetic_captions.enabled:
        _use_synthetic(cfg, caches, data, arrays_needed(objectives) if objectives.needs_teacher else ())
    if not objectives.needs_teacher:
        return data, None, student, objectives, prints
    expect = CacheExpectation.for_data(data, arrays=arrays_needed(objectives),
                                       ignore_fingerprint=cfg.train.ignore_cache_fingerprint)
    for c in caches:
        c.check(expect)
    # targets looked up where batches are built: in the DataLoader workers when there are any
    data.lookup = cache if len(caches) == 1 else EnsembleLookup(caches)
    if info.is_main:
        log(f"teacher targets from the cache{'s' if len(caches) > 1 else ''} {', '.join(folders)}: "
            f"{cache.n_samples} samples × {cache.views} view(s); training draws views 0..{views - 1}")
    return data, data.lookup, student, objectives, prints
