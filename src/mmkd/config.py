"""Typed run configuration: dataclasses loaded from YAML, validated, with ``key=value`` overrides.

Every experiment is one YAML file; a typo in it must fail before any compute is spent, naming the bad key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd.config_io import apply_overrides, from_dict, merge, read_yaml
from mmkd.devices import DeviceError, check_device_spec, check_precision
from mmkd.errors import ConfigError  # re-exported: ``from mmkd.config import ConfigError`` keeps working
from mmkd.plugin_modules import import_plugins
from mmkd.recipes import expand_recipe
from mmkd.teacher_spec import CacheTeacher, parse_member, parse_teacher


@dataclass
class TowerSpec:
    """How to get one student tower.

    source: ``teacher`` shrinks the teacher's tower (keeping ``keep_layers``, default every second one, with
    their weights: weight inheritance); ``new`` builds a randomly initialised tower of ``arch`` from
    ``config`` (Hugging Face config kwargs); anything else is a local folder or hub id of a pretrained tower.
    """

    source: str = "teacher"
    keep_layers: list[int] | None = None  # source teacher: default every second layer; pretrained: default all
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    pooling: str | None = None


@dataclass
class SharedBlockConfig:
    """A unimodal-teacher student: after the modality-specific towers, both token sequences are projected to
    ``width`` and pass through the same ``layers`` transformer layers; the pooled result is each modality's output.

    width: None = the teacher's pooled (CLS) width, so the output regresses it without a map.
    """

    width: int | None = None
    layers: int = 1
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class StudentConfig:
    vision: TowerSpec = field(default_factory=TowerSpec)
    text: TowerSpec = field(default_factory=TowerSpec)
    projection_dim: int | None = None  # None: the teacher's embedding width
    init_projections_from_teacher: bool = True  # where shapes allow
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept frozen
    tokenizer: str | None = None  # folder/hub id; default: the pretrained text tower's, else the teacher's
    shared: SharedBlockConfig | None = None  # set: a student with a shared final block (unimodal-teacher recipe)


ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class RandAugmentConfig:
    """RandAugment (Cubuk et al.) on augmented views (``mmkd.data.randaugment``): ``num_ops`` operations per view,
    each at bin ``magnitude`` of ``num_magnitude_bins`` (torchvision's ranges; 0 is the weakest, bins - 1 the
    strongest). Part of a teacher cache's augmentation fingerprint."""

    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31

    def __post_init__(self) -> None:
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 1:
            raise ValueError(f"num_ops must be an integer ≥ 1 (operations per view; null turns RandAugment off), "
                             f"got {self.num_ops!r}")
        if (isinstance(self.num_magnitude_bins, bool) or not isinstance(self.num_magnitude_bins, int)
                or self.num_magnitude_bins < 2):
            raise ValueError(f"num_magnitude_bins must be an integer ≥ 2, got {self.num_magnitude_bins!r}")
        if (isinstance(self.magnitude, bool) or not isinstance(self.magnitude, int)
                or not 0 <= self.magnitude < self.num_magnitude_bins):
            raise ValueError(f"magnitude must be an integer in [0, num_magnitude_bins - 1] = "
                             f"[0, {self.num_magnitude_bins - 1}], got {self.magnitude!r}")


@dataclass
class SyntheticCaptionsConfig:
    """MobileCLIP's synthetic captions, from a teacher cache built with ``--captioner``: each captioned image
    also draws one of its N synthetic captions per step, and the loss on (image, synthetic caption) is added to
    the loss on (image, real caption) with ``weight`` (MobileCLIP's ``DRClipLoss`` sums them: 1.0).
    ``unpaired``: uncaptioned images take part too, paired with their synthetic caption in that second loss."""

    enabled: bool = False
    weight: float = 1.0
    unpaired: bool = False


@dataclass
class DataConfig:
    """Where training pairs come from.

    train: a data spec (``FORMAT:PATH``, e.g. ``jsonl:data/pairs.jsonl`` or ``world:train``).
    unpaired: optional spec of extra images without captions, used only by image-side distillation terms.
    """

    train: str = "world:train"
    unpaired: str | None = None
    limit: int | None = None  # keep the first N captioned samples
    unpaired_limit: int | None = None
    batch_size: int = 128
    unpaired_batch_size: int = 0
    augment: bool = False
    augment_paired: bool = True  # false: with augment, captioned images keep view 0 (their captions may name
    # positions a crop contradicts); only the uncaptioned ones are augmented
    label_captions: str | None = None  # e.g. "a photo of a {}.": captions for labelled, uncaptioned images
    captions_per_image: int | None = None  # keep each image's first N captions (fewer teacher/text targets)
    views: int | None = None  # distinct augmented views per sample (view 0 = unaugmented); None: see README
    world_size_train: int = 4000  # built-in world: images in the generated train split
    world_size_unpaired: int = 20000
    on_error: str = "raise"  # a bad sample (e.g. a shard member missing): raise (stop, naming it) or skip (count it)
    max_image_pixels: int | None = None  # refuse larger images (decompression bombs); None: PIL's 89,478,485
    only_cached_shards: bool = False  # teacher: cache:DIR partly built: train on the shards it holds (else refused)
    workers: int | None = None  # DataLoader processes decoding batches; 0: in the training process; None: auto
    shard_window: int = 8  # shards whose samples are shuffled together (WebDataset shards; see README)
    randaugment: RandAugmentConfig | None = None  # on augmented views (view ≥ 1) after the crop; None: off
    # [lo, hi]: an augmented view's crop covers a fraction of the image's area drawn from it (part of a teacher
    # cache's fingerprint); None: (0.6, 1.0), or the range a teacher cache's views were built with
    crop_scale: list[float] | None = None
    synthetic_captions: SyntheticCaptionsConfig = field(default_factory=SyntheticCaptionsConfig)


@dataclass
class ObjectiveSpec:
    name: str = "clip"
    weight: float = 1.0
    towers: list[str] | None = None  # None: the objective's own default (both towers; mfd: image)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0  # largest gradient norm; null: no clipping
    accumulate: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK where CUDA exists, else cpu)
    precision: str | None = None  # fp32 | bf16 | fp16 (fp16 with a grad scaler); None: train.bf16's, else fp32
    bf16: bool | None = None  # the old spelling of precision: bf16 (true) / fp32 (false)
    compile: bool = False  # torch.compile the student's towers (in place: checkpoints keep their keys)
    grad_checkpointing: bool = False  # recompute HF tower activations in the backward: less memory, more time
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    threads: int | None = None
    ignore_cache_fingerprint: bool = False  # use a teacher cache built for other data/transforms (at your risk)

    def __post_init__(self) -> None:
        """Settle ``precision`` from the old ``bf16`` flag (both given must agree), so the rest reads one key."""
        try:
            check_device_spec(self.device, "train.device")
            if self.precision is not None:
                check_precision(self.precision, "train.precision")
        except DeviceError as e:
            raise ConfigError(str(e)) from None
        implied = None if self.bf16 is None else ("bf16" if self.bf16 else "fp32")
        if self.precision is not None and implied is not None and self.precision != implied:
            raise ConfigError(f"train.bf16: {str(self.bf16).lower()} and train.precision: {self.precision} disagree; "
                              "keep train.precision (train.bf16 is its old spelling) and drop train.bf16")
        self.precision = self.precision or implied or "fp32"


@dataclass
class EvalSpec:
    """One evaluation, as ``distill``'s ``eval:`` list, a suite's ``tasks:`` (``mmkd eval all``) and the single
    ``mmkd eval KIND`` commands give it; which keys matter depends on ``kind`` (see README, "mmkd eval all").

    data: None means the built-in ``world:test`` in a run's ``eval:``; a suite's zeroshot/retrieval needs one.
    split: None means ``test`` where the format has splits; a run's ``eval:`` refuses an explicit split the
    format lacks. name: None means ``KIND:DATA[:CLASS_SET]`` in a run's ``eval:``, the class set or data
    format in a suite.
    """

    kind: str = "zeroshot"  # zeroshot | retrieval | bias | efficiency
    data: str | None = None  # FORMAT:PATH; optional for bias (adds the image probe)
    name: str | None = None  # key in metrics.json
    class_set: str | None = None  # world:… only: colour_shape, shape, colour
    split: str | None = None  # cifar10/cifar100/stl10 only
    limit: int | None = None  # first N records only
    templates: str | None = None  # zeroshot: built-in ensemble name or template file (default: by format)
    sigmoid: bool = False  # zeroshot: also SigLIP's sigmoid probabilities (models with a learnt logit bias only)
    words: str | None = None  # bias: word-list YAML (default: the packaged assets/bias_words.yaml)
    template: str | None = None  # bias: text-probe prompt, overrides the word file's
    min_group_images: int = 5  # bias: fewest images per caption group for the image probe
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])  # efficiency
    budget_s: float = 3.0  # efficiency: seconds of timing per model
    threads: int | None = None  # efficiency: CPU threads while timing (default: torch's current setting)


@dataclass
class RunConfig:
    # model folder or hub id, cache:DIR for a teacher cache built by `mmkd cache`, or empty: no teacher
    # (task objectives only: training from scratch, e.g. a teacher); a list of them: an ensemble (README,
    # "Teacher ensembles"), all models or all caches; a one-element list is its element
    teacher: str | list[str] = ""
    teacher_modality: str = "image_text"  # image_text: a dual encoder; image: an image model only (unimodal teacher)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec()])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: list[EvalSpec] = field(default_factory=list)
    out: str = "runs/distill"
    cache_dir: str = "runs/.cache"
    # modules imported before anything is built: a user's own objectives, formats, towers (mmkd.register_*);
    # left out of the written config when empty, so runs from before plugins existed keep their config hash
    plugins: list[str] = field(default_factory=list, metadata={"omit_when_empty": True})

    def __post_init__(self) -> None:
        import_plugins(self.plugins)


PRESET_PREFIX = "preset:"


def student_presets() -> dict[str, Path]:
    """Named student recipes shipped with mmkd (``student: preset:NAME``): YAML files of StudentConfig keys."""
    folder = Path(__file__).parent / "assets" / "presets"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)}


def expand_preset(data: dict[str, Any]) -> None:
    """``student: preset:NAME`` becomes the preset's keys; ``student: {preset: NAME, ...}`` overrides them."""
    student = data.get("student")
    if isinstance(student, str) and student.startswith(PRESET_PREFIX):
        name, extra = student[len(PRESET_PREFIX):], {}
    elif isinstance(student, dict) and "preset" in student:
        extra = dict(student)
        name = str(extra.pop("preset"))
        name = name[len(PRESET_PREFIX):] if name.startswith(PRESET_PREFIX) else name
    else:
        return
    presets = student_presets()
    if name not in presets:
        raise ConfigError(f"student: unknown preset {name!r}; valid: {', '.join(presets)}")
    data["student"] = merge(read_yaml(presets[name]), extra)


def student_config(value: str | dict[str, Any] | StudentConfig) -> StudentConfig:
    """A StudentConfig from a preset name (``half-depth`` or ``preset:half-depth``), a mapping or itself."""
    if isinstance(value, StudentConfig):
        return value
    if isinstance(value, str) and not value.startswith(PRESET_PREFIX):
        value = PRESET_PREFIX + value
    data = {"student": copy.deepcopy(value)}
    expand_preset(data)
    if not isinstance(data["student"], dict):
        raise ConfigError(f"student: expected a preset name or a mapping of student keys, got {value!r}")
    return from_dict(StudentConfig, data["student"], "student")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or defaults when path is None), apply overrides, validate."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)


def expanded(data: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """A run config's plain data (a copy) with its recipe and student preset expanded and ``overrides`` applied:
    what every reader of a run config (a run's, a sweep file's) types."""
    data = expand_recipe(copy.deepcopy(data))  # the file's own keys win over its recipe's; overrides refine both
    expand_preset(data)  # before overrides, so that student.freeze=... refines the preset
    apply_overrides(data, overrides or [])
    data = expand_recipe(data)  # an override may name a recipe (recipe=NAME) or a preset (student=preset:NAME)
    expand_preset(data)
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """A run config from plain data (a parsed YAML file, or a dict written in a notebook), validated."""
    cfg = from_dict(RunConfig, expanded(data, overrides))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    if t.steps < 1:
        raise ConfigError("train.steps must be ≥ 1")
    if t.accumulate < 1:
        raise ConfigError("train.accumulate must be ≥ 1")
    if t.lr <= 0:
        raise ConfigError("train.lr must be > 0")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every must be ≥ 1 (steps between metrics lines), got {t.log_every}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip must be > 0 (the largest gradient norm), or null to turn clipping off; "
                          f"got {t.grad_clip}")
    if t.ckpt_every < 0:
        raise ConfigError(f"train.ckpt_every must be ≥ 0 (0: only the final checkpoint), got {t.ckpt_every}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be ≥ 1, got {t.keep_checkpoints}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be ≥ 0, got {t.warmup_steps}")
    if cfg.data.captions_per_image is not None and cfg.data.captions_per_image < 1:
        raise ConfigError("data.captions_per_image must be ≥ 1 (or null for all)")
    if cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size must be ≥ 1")
    for key in ("limit", "unpaired_limit", "max_image_pixels"):
        value = getattr(cfg.data, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be ≥ 1 (or null for no limit), got {value}")
    for key in ("world_size_train", "world_size_unpaired"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key} must be ≥ 1, got {getattr(cfg.data, key)}")
    if cfg.data.unpaired_batch_size < 0:
        raise ConfigError(f"data.unpaired_batch_size must be ≥ 0, got {cfg.data.unpaired_batch_size}")
    if cfg.data.workers is not None and cfg.data.workers < 0:
        raise ConfigError(f"data.workers must be ≥ 0 (0: decode in the training process; null: auto), "
                          f"got {cfg.data.workers}")
    if cfg.data.shard_window < 1:
        raise ConfigError(f"data.shard_window must be ≥ 1 (shards shuffled together), got {cfg.data.shard_window}")
    if cfg.data.on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error: {cfg.data.on_error!r} is not one of {', '.join(ON_ERROR)}")
    for i, spec in enumerate(cfg.eval):
        if spec.limit is not None and spec.limit < 1:
            raise ConfigError(f"eval[{i}].limit must be ≥ 1 (or null for all samples), got {spec.limit}")
    if cfg.teacher_modality not in ("image_text", "image"):
        raise ConfigError(f"teacher_modality: {cfg.teacher_modality!r} is not one of image_text, image")
    if cfg.data.label_captions is not None and "{}" not in cfg.data.label_captions:
        raise ConfigError(f"data.label_captions: {cfg.data.label_captions!r} needs a '{{}}' for the class name")
    if cfg.data.views is not None and cfg.data.views < 1:
        raise ConfigError("data.views must be ≥ 1 (view 0 is the unaugmented image)")
    check_teachers(cfg)
    spec = parse_teacher(cfg.teacher)
    check_crop_scale(cfg.data.crop_scale)
    if cfg.data.randaugment is not None and not cfg.data.augment:
        raise ConfigError("data.randaugment applies to augmented views only, and data.augment is false: set "
                          "data.augment: true, or remove data.randaugment")
    if cfg.data.only_cached_shards and not isinstance(spec, CacheTeacher):
        raise ConfigError("data.only_cached_shards: true needs teacher: cache:DIR (it trains on the shards a partly "
                          "built teacher cache holds)")
    syn = cfg.data.synthetic_captions
    if syn.weight < 0:
        raise ConfigError(f"data.synthetic_captions.weight must be ≥ 0, got {syn.weight}")
    if syn.enabled and not (spec.members and all(isinstance(m, CacheTeacher) for m in spec.members)):
        raise ConfigError("data.synthetic_captions.enabled: true needs teacher: cache:DIR, a teacher cache built with "
                          "`mmkd cache --captioner MODEL --synthetic-captions N` (the captions and their teacher "
                          "targets are stored there; for an ensemble, every member's cache)")
    if spec == CacheTeacher(""):
        raise ConfigError("teacher: 'cache:' needs the cache folder, e.g. cache:runs/teacher-cache")
    if isinstance(spec, CacheTeacher) and cfg.teacher_modality != "image_text":
        raise ConfigError("teacher_modality: a teacher cache (cache:DIR) holds a dual encoder's targets; "
                          "use teacher_modality: image_text")
    if not cfg.objectives:
        raise ConfigError("objectives: list at least one objective (e.g. {name: clip})")
    for i, spec in enumerate(cfg.objectives):
        for tower in spec.towers or ():
            if tower not in ("image", "text"):
                raise ConfigError(f"objectives[{i}].towers: {tower!r} is not one of image, text")


def check_crop_scale(value: list[float] | None) -> None:
    """data.crop_scale must be [lo, hi] with 0 < lo ≤ hi ≤ 1 (area fractions of the image a crop covers)."""
    if value is not None and not (len(value) == 2 and 0 < value[0] <= value[1] <= 1):
        raise ConfigError(f"data.crop_scale must be [lo, hi] with 0 < lo ≤ hi ≤ 1 (the fraction of the image's area "
                          f"a crop covers), got {value}")


def teacher_members(cfg: RunConfig) -> list[str]:
    """The configured teachers in order: one for ``teacher: X``, several for an ensemble, none without one."""
    if isinstance(cfg.teacher, list):
        return list(cfg.teacher)
    return [cfg.teacher] if cfg.teacher else []


def check_teachers(cfg: RunConfig) -> None:
    """An ensemble (``teacher: [A, B]``) is all caches or all dual-encoder models, each named once; a one-element
    list becomes its element, so it runs (and fingerprints) exactly as the string."""
    if not isinstance(cfg.teacher, list):
        return
    if not cfg.teacher:
        raise ConfigError("teacher: an empty list names no teacher; give one or more (model folder, hub id, "
                          "open_clip:FOLDER or cache:DIR), or leave the key out for no teacher")
    for i, t in enumerate(cfg.teacher):
        if not t.strip():
            raise ConfigError(f"teacher[{i}]: empty; give a model folder, hub id, open_clip:FOLDER or cache:DIR")
        if parse_member(t) == CacheTeacher(""):
            raise ConfigError(f"teacher[{i}]: 'cache:' needs the cache folder, e.g. cache:runs/teacher-cache")
        if t in cfg.teacher[:i]:
            raise ConfigError(f"teacher[{i}]: {t!r} repeats teacher[{cfg.teacher.index(t)}]; name each teacher once")
    if len(cfg.teacher) == 1:
        cfg.teacher = cfg.teacher[0]
        return
    cached = [isinstance(parse_member(t), CacheTeacher) for t in cfg.teacher]
    if any(cached) and not all(cached):
        c, m = cached.index(True), cached.index(False)
        raise ConfigError(f"teacher: teacher[{c}] ({cfg.teacher[c]}) is a teacher cache but teacher[{m}] "
                          f"({cfg.teacher[m]}) is a model; an ensemble is all caches or all models: build a cache "
                          f"of {cfg.teacher[m]} with `mmkd cache` (same data and --views) and list it as cache:DIR")
    if cfg.teacher_modality != "image_text":
        raise ConfigError("teacher: an ensemble takes dual encoders (teacher_modality: image_text); an image-only "
                          "teacher (teacher_modality: image) takes one teacher")
    if cfg.data.only_cached_shards:
        raise ConfigError("data.only_cached_shards: true takes one teacher cache, not an ensemble; build every "
                          "member's cache over the same shards")
