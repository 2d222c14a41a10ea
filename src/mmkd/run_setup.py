"""One way to build a run: ``prepare(cfg)`` parses the teacher once and returns a complete, immutable `RunSetup`
(student, teacher targets, data, objectives, fingerprints) that ``run_distill`` trains, so `mmkd distill`, the
demo, sweeps and studies all start a run the same way.

The teacher may be a model (a dual encoder, or an image model only with ``teacher_modality: image``) run online
or tabled once, a teacher cache read by key (no model loaded), an ensemble of either, or none (task objectives
only: training from scratch, which is also how mmkd trains a teacher of its own).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mmkd.config import ConfigError, RunConfig, teacher_members
from mmkd.data.batches import ImageBank, TrainData, in_memory
from mmkd.data.records import BadSamples, DataError, Record
from mmkd.data.resolve import records_from_spec, zeroshot_classes
from mmkd.data.transforms import with_crop_scale, with_randaugment
from mmkd.dist import DistInfo
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.hub import load_dual_encoder
from mmkd.models.student import build_student, feature_widths
from mmkd.models.towers import tower_width
from mmkd.objectives.base import ObjectiveContext, WeightedSum, build_objectives
from mmkd.teacher.cache import CachedTeacher, CacheError, CacheExpectation, arrays_needed
from mmkd.teacher.cache.synthetic import SyntheticCaptions, check_same_captions
from mmkd.teacher.ensemble import EnsembleLookup, EnsembleTargets, check_agreement
from mmkd.teacher.fingerprint import state_dict_sha256
from mmkd.teacher.targets import OnlineTeacher, TableTeacher, Targets, precompute, table_images
from mmkd.teacher.unimodal import ImageTeacher, load_image_teacher
from mmkd.teacher_spec import CacheTeacher, TeacherSpec, is_cached, parse_teacher
from mmkd.train.runfolder import data_fingerprint

TeacherBanks = tuple[ImageBank, ImageBank | None]  # a teacher's (paired, unpaired) image banks


@dataclass(frozen=True)
class RunSetup:
    """Everything a run trains with, built whole from its config by `prepare`."""

    teacher: TeacherSpec  # what ``teacher:`` names
    student: DualEncoder  # drawn from train.seed (its towers from the first teacher or cache where asked)
    objectives: WeightedSum
    data: TrainData  # batches, with the teacher's pixels, cache lookups or synthetic captions they carry
    targets: Targets | None  # the teacher's answer per batch (online, tabled or cached); None: task objectives only
    fingerprints: dict[str, Any]  # teacher (and cache) and data fingerprints: the run's identity
    skipped: BadSamples  # samples left out under ``data.on_error: skip``


def prepare(cfg: RunConfig, info: DistInfo | None = None, log: Any = print, cache: TargetCache | None = None,
            device: torch.device | None = None) -> RunSetup:
    """The run ``cfg`` describes, ready to train on ``device`` (teachers run there) in process group ``info``.

    cache: teachers and targets shared across runs (a sweep's, the demo's); log: what was chosen (rank 0)."""
    info = info or DistInfo()
    spec = parse_teacher(cfg.teacher)
    bad = BadSamples(cfg.data.on_error)
    build = _from_caches if is_cached(spec) else _from_models
    return build(cfg, spec, info, log, cache, bad, device)


def _from_models(cfg: RunConfig, spec: TeacherSpec, info: DistInfo, log: Any, cache: TargetCache | None,
                 bad: BadSamples, device: torch.device | None) -> RunSetup:
    """A loaded teacher (dual encoder or image-only; or each of an ensemble's) runs per batch or once up front, on
    ``device`` (the training device); or there is no teacher. The student is built from the (first) teacher."""
    members = member_configs(cfg)
    teachers = [cache.teacher(m) if cache is not None else load_teacher(m) for m in members]
    student = build_student(teachers[0], cfg.student, seed=cfg.train.seed)
    objectives = _objectives(cfg, [teacher_context(student, t) for t in teachers])
    if objectives.needs_teacher and teachers[0] is None:
        needy = sorted({n for n, o in zip(objectives.names, objectives.objectives) if o.uses_teacher})
        raise ConfigError(f"objectives {needy} distil from a teacher, but config key 'teacher' is empty: give a "
                          "model folder or hub id (or cache:DIR), or keep only task objectives "
                          "(clip, triplet, siglip)")
    paired, unpaired = training_records(cfg, bad)
    aug = view_augmentation(cfg, None)  # the teacher's banks below: the same views
    banks = _banks(cfg, student, paired, unpaired, aug)
    t_banks = ([_teacher_banks(m, t, paired, unpaired, device, aug) for m, t in zip(members, teachers)]
               if objectives.needs_teacher else [])
    views = cfg.data.views or (ONLINE_VIEWS if cfg.data.augment else 1)
    ride = bool(t_banks) and not tabled(cfg, t_banks[0], views)
    data = _train_data(cfg, info, banks, views, teacher_banks=t_banks[0] if ride else None)
    targets: Targets | None = None
    if t_banks:
        parts = [(_online_targets(m, t, b, paired, objectives, cache, device, log, ride, views), b)
                 for m, t, b in zip(members, teachers, t_banks)]
        targets = parts[0][0] if len(parts) == 1 else _online_ensemble(members, parts, data)
    fingerprints = [cache.fingerprint(m, t) if cache is not None else teacher_fingerprint(t)
                    for m, t in zip(members, teachers)]
    prints = {"teacher": fingerprints[0] if len(fingerprints) == 1 else fingerprints}
    return RunSetup(spec, student, objectives, data, targets, _with_data(prints, data), bad)


def _teacher_banks(cfg: RunConfig, teacher: Any, paired: Sequence[Record], unpaired: Sequence[Record] | None,
                   device: torch.device | None, aug: dict[str, Any] | None) -> TeacherBanks:
    """One teacher (``cfg`` names it), moved to ``device``, and its image banks: the student's views at the
    teacher's resolution and normalisation (aug: the student's RandAugment settings)."""
    teacher.to(device or "cpu")
    tm = teacher.meta
    t_paired = ImageBank(paired, tm.image_size, tm.image_mean, tm.image_std, augment_paired(cfg), cfg.train.seed,
                         aug)
    t_unpaired = (ImageBank(unpaired, tm.image_size, tm.image_mean, tm.image_std, cfg.data.augment,
                            cfg.train.seed, aug) if unpaired else None)
    return t_paired, t_unpaired


def tabled(cfg: RunConfig, banks: TeacherBanks, views: int) -> bool:
    """Whether the online teacher's targets are computed once into a table rather than at every step: the data
    are held in memory (a table over streamed shards would be O(samples)) and each sample has finitely many views
    (no augmentation, or ``data.views`` K of them) whose table costs no more teacher passes than the steps would.
    Otherwise the teacher's pixels ride with each batch, decoded in the loader's workers."""
    held = [b for b in banks if b is not None]
    if not all(in_memory(b.records) for b in held):
        return False
    if not cfg.data.augment:
        return True
    per_step = cfg.train.steps * (cfg.data.batch_size + cfg.data.unpaired_batch_size)
    return views != ONLINE_VIEWS and table_images(held, views) <= per_step


def _online_targets(cfg: RunConfig, teacher: Any, banks: TeacherBanks, paired: Sequence[Record],
                    objectives: WeightedSum, cache: TargetCache | None, device: torch.device | None, log: Any,
                    per_batch: bool, views: int) -> Targets:
    """One teacher's targets: run per batch (per_batch: see ``tabled``), or tabled once over ``views`` views."""
    # a shared cache computes features too, so every run of a sweep can use the same table
    online = OnlineTeacher(teacher, *banks, features=cache is not None or wants_features(objectives))
    if per_batch:
        return online

    def compute() -> TableTeacher:
        held = [b for b in banks if b is not None]
        what = (f"{views} views of each augmented image" if cfg.data.augment else "no augmentation")
        log(f"computing teacher targets once for {cfg.teacher} ({what}: every step reuses them)")
        return precompute(online, held, [c for r in paired for c in r.captions], views=views)  # K: augmented banks

    table = cache.table(_targets_key(cfg), compute) if cache is not None else compute()
    return table.to(device or "cpu")


def _from_caches(cfg: RunConfig, spec: TeacherSpec, info: DistInfo, log: Any, cache: TargetCache | None,
                 bad: BadSamples, device: torch.device | None) -> RunSetup:
    """Train from a teacher cache (or an ensemble's caches, which must replay the same views): no teacher is
    loaded; targets are read by key at the replayed view. The student is built from the first cache's teacher."""
    folders = [m.folder for m in spec.members if isinstance(m, CacheTeacher)]
    caches = [CachedTeacher.open(f) for f in folders]
    check_agreement(caches)
    first = caches[0]
    student = build_student(first.teacher_info(), cfg.student, seed=cfg.train.seed)
    paired, unpaired = training_records(cfg, bad)
    if cfg.data.only_cached_shards:
        paired, unpaired = _cached_shards_only(first, folders[0], paired, unpaired, info, log)
    # the cache's crops, training's RandAugment and crop range: a cache built with others is refused by check()
    aug = view_augmentation(cfg, first.augmentation)
    banks = _banks(cfg, student, paired, unpaired, aug, first)
    objectives = _objectives(cfg, [cache_context(student, c) for c in caches])
    needed = arrays_needed(objectives) if objectives.needs_teacher else ()
    synthetic = _synthetic(cfg, caches, needed) if cfg.data.synthetic_captions.enabled else None
    # targets looked up where batches are built: in the DataLoader workers when there are any
    lookup = (first if len(caches) == 1 else EnsembleLookup(caches)) if objectives.needs_teacher else None
    views = cfg.data.views or (first.views if cfg.data.augment else 1)
    data = _train_data(cfg, info, banks, views, lookup=lookup, synthetic=synthetic)
    if lookup is not None:
        expect = CacheExpectation.for_data(data, arrays=needed, ignore_fingerprint=cfg.train.ignore_cache_fingerprint)
        for c in caches:
            c.check(expect)
        if info.is_main:
            log(f"teacher targets from the cache{'s' if len(caches) > 1 else ''} {', '.join(folders)}: "
                f"{first.n_samples} samples × {first.views} view(s); training draws views 0..{views - 1}")
    t_prints = [c.info.teacher.weights_sha256 for c in caches]
    c_prints = [c.info.fingerprint_sha256 for c in caches]
    prints = ({"teacher": t_prints[0], "cache": c_prints[0]} if len(caches) == 1
              else {"teacher": t_prints, "cache": c_prints})
    return RunSetup(spec, student, objectives, data, lookup, _with_data(prints, data), bad)


def _cached_shards_only(cache: CachedTeacher, folder: str, paired: Sequence[Record],
                        unpaired: Sequence[Record] | None, info: DistInfo, log: Any
                        ) -> tuple[Sequence[Record], Sequence[Record] | None]:
    """data.only_cached_shards: a partly built cache: train on the shards it holds, and say which are left out."""
    paired, lacking = cache.restrict(paired)
    unpaired, lacking_unpaired = cache.restrict(unpaired or [])
    lacking = list(dict.fromkeys(lacking + lacking_unpaired))
    if not paired:
        raise ConfigError(f"data.only_cached_shards: the teacher cache {folder} holds none of the training "
                          "data's shards; build it with `mmkd cache` first")
    if lacking and info.is_main:
        log(f"data.only_cached_shards: training on the {len(cache.shards)} shard(s) the teacher cache holds; "
            f"left out {len(lacking)} shard(s) it lacks, e.g. {lacking[0]}")
    return paired, unpaired or None


def _objectives(cfg: RunConfig, contexts: list[ObjectiveContext]) -> WeightedSum:
    """The configured objectives, given what each teacher offers (one context per member of an ensemble)."""
    return build_objectives(cfg.objectives, contexts if len(contexts) > 1 else contexts[0], seed=cfg.train.seed)


def view_augmentation(cfg: RunConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The views' settings: ``base`` (a cache's, or none: the defaults) with the config's RandAugment and, where set,
    its data.crop_scale."""
    return with_crop_scale(with_randaugment(base, cfg.data.randaugment), cfg.data.crop_scale)


def _banks(cfg: RunConfig, student: DualEncoder, paired: Sequence[Record], unpaired: Sequence[Record] | None,
           aug: dict[str, Any] | None, cache: CachedTeacher | None = None) -> tuple[ImageBank, ImageBank | None]:
    """The student's image banks: its own resolution and normalisation; a cache's replay its cached views."""
    sm = student.meta

    def bank(records: Sequence[Record], augment: bool) -> ImageBank:
        if cache is not None:
            return cache.bank(records, sm.image_size, sm.image_mean, sm.image_std, augment=augment, augmentation=aug)
        return ImageBank(records, sm.image_size, sm.image_mean, sm.image_std, augment, cfg.train.seed, aug)

    return bank(paired, augment_paired(cfg)), (bank(unpaired, cfg.data.augment) if unpaired else None)


def _with_data(prints: dict[str, Any], data: TrainData) -> dict[str, Any]:
    """The teacher's fingerprints and then the data's: what a run's identity hashes."""
    return {**prints, "data": data_print(data.paired.records, data.unpaired.records if data.unpaired else None)}


def _train_data(cfg: RunConfig, info: DistInfo, banks: tuple[ImageBank, ImageBank | None], views: int,
                **extra: Any) -> TrainData:
    return TrainData(*banks, cfg.data.batch_size, cfg.data.unpaired_batch_size, world=info.world_size,
                     seed=cfg.train.seed, views=views, window=cfg.data.shard_window, **extra)


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
    key = (cfg.teacher, cfg.teacher_modality, os.path.abspath(cfg.cache_dir), d.train, d.limit, d.unpaired,
           d.unpaired_limit, d.world_size_train, d.world_size_unpaired, d.label_captions, d.captions_per_image)
    if not d.augment:
        return key
    # a table of views: which views (their seed is train.seed) of which images
    return key + (d.augment_paired, d.views, json.dumps(view_augmentation(cfg), sort_keys=True, default=str),
                  cfg.train.seed)


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


def member_configs(cfg: RunConfig) -> list[RunConfig]:
    """One single-teacher config per member of ``cfg``'s teacher (itself for one teacher or none)."""
    members = teacher_members(cfg)
    return [cfg] if len(members) < 2 else [replace(cfg, teacher=t) for t in members]


def wants_features(objectives: WeightedSum) -> bool:
    """Whether any objective reads the teacher's pooled pre-projection features (not only its embeddings)."""
    return any(o.teacher_features for o in objectives.objectives)


def _online_ensemble(members: list[RunConfig], parts: list[tuple[Targets, TeacherBanks]], data: TrainData
                     ) -> EnsembleTargets:
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
    t_bias = cache.info.teacher.logit_bias  # a SigLIP teacher's (None for others)
    return ObjectiveContext(student.projection_dim, cache.embed_dim, feature_widths(student), cache.feature_dims,
                            teacher_logit_scale=cache.logit_scale if t_bias is not None else None,
                            teacher_logit_bias=t_bias,
                            student_logit_bias=getattr(student, "logit_bias", None) is not None)


def _synthetic(cfg: RunConfig, caches: Sequence[CachedTeacher], arrays: Sequence[str]) -> SyntheticCaptions:
    """data.synthetic_captions: draw one of each image's cached synthetic captions per step (an ensemble's caches
    must hold the same captions: the first cache's are drawn, each cache gives its teacher's targets of them)."""
    syn = cfg.data.synthetic_captions
    try:
        synthetic = SyntheticCaptions(caches[0], cfg.train.seed, unpaired=syn.unpaired, weight=syn.weight)
        for other in caches[1:]:
            SyntheticCaptions(other, cfg.train.seed)  # (each cache must hold synthetic captions)
            check_same_captions(caches[0], other)
    except CacheError as e:
        raise ConfigError(f"data.synthetic_captions: {e}") from None
    for c in caches:
        if "text_features" in arrays and "syncap_features" not in c.arrays:
            raise ConfigError(f"data.synthetic_captions: the teacher cache {c.root} holds no pooled features of its "
                              "synthetic captions, which an objective reads: rebuild it with --features")
    return synthetic
