"""``mmkd matching demo``: S2's study end to end, on the built-in world (random and hard negatives) and on
the real COCO photos beside the checkout when present.

For each setting: build the pairs → fine-tune the teacher's matcher (once; its logits cached) → train the
baseline student (BCE) → train the KD students (KL and sigmoid-BCE, T = 3, α = 0.5, S2's best) from the same
initialisation and batch order, each labelled pair joined by 4 unlabelled ones scored by the teacher (its
image with other training captions: the transfer set). Writes ``OUT/matching.json`` (test metrics per
setting and model), ``OUT/report.md`` (the table), ``OUT/matching.png`` and one study folder per setting.

Budgets (chosen for 2 shared CPU cores, stated in the report): the teacher's text tower stays frozen (its
features computed once) and the vision tower, projections and head are fine-tuned; students train 15 epochs
at lr 5e-3 (S2: 10 epochs at 1e-4, too slow for a from-scratch ResNet in a CPU budget). One torch thread:
these models are small enough that more threads only add synchronisation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmkd.data.matching import BuildConfig, build_pairs_file
from mmkd.matching.data import load_pair_data
from mmkd.matching.losses import KDConfig
from mmkd.matching.metrics import summary
from mmkd.matching.models import StudentConfig
from mmkd.matching.report import demo_table, plot_demo
from mmkd.matching.study import MatchingStudy, StudyConfig, _atomic_json
from mmkd.matching.train import StudentTrainConfig, TeacherTrainConfig

DEFAULT_COCO = "../shared/data/coco-mini"


@dataclass
class MatchingDemoConfig:
    world_images: int = 3000
    teacher_pretrain: dict[str, Any] = field(default_factory=lambda: dict(
        teacher_vision=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                            patch_size=4),
        teacher_pool=8192, teacher_steps=300, teacher_batch=128))
    teacher: TeacherTrainConfig = field(default_factory=lambda: TeacherTrainConfig(
        trainable="vision", epochs=5, lr=1e-4))
    student: StudentConfig = field(default_factory=StudentConfig)
    train: StudentTrainConfig = field(default_factory=lambda: StudentTrainConfig(epochs=15, batch_size=64, lr=5e-3,
                                                                                 transfer=4))
    kd: list[KDConfig] = field(default_factory=lambda: [KDConfig("kl", 3.0, 0.5), KDConfig("bce", 3.0, 0.5)])
    threads: int | None = 1

    @classmethod
    def quick(cls) -> MatchingDemoConfig:
        """Seconds instead of minutes: the same code path on a few hundred pairs (what the end-to-end test runs)."""
        return cls(world_images=240,
                   teacher_pretrain=dict(teacher_vision=dict(hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64,
                                                             patch_size=8),
                                         teacher_pool=256, teacher_steps=5, teacher_batch=32),
                   teacher=TeacherTrainConfig(trainable="vision", epochs=1, lr=1e-4),
                   train=StudentTrainConfig(epochs=2, batch_size=64, lr=5e-3, transfer=2))

    def study(self) -> StudyConfig:
        return StudyConfig(teacher=self.teacher, student=self.student, train=self.train, kd=list(self.kd))


def demo_teacher(cfg: MatchingDemoConfig, cache: Path, log: Any) -> Path:
    """The dual encoder to start from: mmkd's demo teacher recipe (a ViT locked to MiniLM), trained once."""
    from mmkd.data import world
    from mmkd.demo import DemoConfig, get_teacher

    dcfg = DemoConfig(**cfg.teacher_pretrain, threads=cfg.threads)
    val = world.to_records(world.load_split("val", 128, cache / "world"))
    _, folder = get_teacher(dcfg, cache, val, log)
    return folder


def run_matching_demo(out: str | Path = "runs/matching", quick: bool = False, teacher: str | Path | None = None,
                      cache_dir: str | Path | None = None, coco: str | Path | None = DEFAULT_COCO,
                      cfg: MatchingDemoConfig | None = None, log: Any = print) -> dict[str, Any]:
    cfg = cfg or (MatchingDemoConfig.quick() if quick else MatchingDemoConfig())
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    teacher_dir = Path(teacher) if teacher else demo_teacher(cfg, cache, log)
    from mmkd.matching.text import TextEncoder

    encoder = TextEncoder(cache_file=cache / "text-features.npz")
    settings: list[tuple[str, str, str, int | None]] = [
        ("random", "world:train", "random", cfg.world_images), ("hard", "world:train", "hard", cfg.world_images)]
    coco_file = Path(coco) / "captions.jsonl" if coco else None
    if coco_file is not None and coco_file.is_file():
        settings.append(("coco", f"jsonl:{coco_file}", "random", None))
    elif coco:
        log(f"COCO photos not found at {coco}; the coco setting is skipped")

    results: dict[str, dict[str, dict[str, float]]] = {}
    details: dict[str, Any] = {}
    for name, spec, negatives, n in settings:
        log(f"\n== {name}: {spec}, {negatives} negatives ==")
        pairs_path, counts = build_pairs_file(
            spec, out / "pairs" / f"{name}.jsonl",
            BuildConfig(negatives=negatives, seed=0, hard_candidates="drawn" if spec.startswith("world:") else "all"),
            cache_dir=cache, world_n=n or 4000, embed=encoder)
        encoder.save_cache()
        log(f"pairs: {pairs_path} " + ", ".join(f"{s} {c['pairs']}" for s, c in counts.items()))
        data = load_pair_data(pairs_path, cache)
        study = MatchingStudy(data, teacher_dir, out / name, cfg.study(), log=log, text_encoder=encoder)
        metrics = study.run()
        results[name] = {m: summary(r["test"]) for m, r in metrics["models"].items()}
        details[name] = {"pairs": str(pairs_path), "counts": counts,
                         "thresholds": {m: r["test"]["threshold"] for m, r in metrics["models"].items()},
                         "seconds": metrics["seconds"], "teacher_errors": len(metrics["teacher_errors"])}
    encoder.save_cache()
    _atomic_json(out / "matching.json", results)
    plot_demo(results, out / "matching.png")
    seconds = round(time.perf_counter() - t0, 1)
    _atomic_json(out / "demo.json", {"quick": quick, "teacher": str(teacher_dir), "settings": details,
                                     "config": _config_json(cfg), "seconds": seconds})
    _write_report(out, results, details, cfg, teacher_dir, seconds)
    return results


def _config_json(cfg: MatchingDemoConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["student"] = cfg.student.to_json()
    return d


def _write_report(out: Path, results: dict[str, Any], details: dict[str, Any], cfg: MatchingDemoConfig,
                  teacher_dir: Path, seconds: float) -> None:
    kd = ", ".join(f"{k.variant} T={k.temperature} α={k.alpha}" for k in cfg.kd)
    kd += f"; {cfg.train.transfer} teacher-scored unlabelled pairs per labelled pair" if cfg.train.transfer else ""
    text = ["# Binary image–text matching demo (S2's study)", "",
            f"Teacher: `{teacher_dir}` with a {cfg.teacher.head} head, fine-tuned {cfg.teacher.epochs} epochs "
            f"(Adam lr {cfg.teacher.lr}, trainable: {cfg.teacher.trainable}). Students: ResNet "
            f"{cfg.student.resnet} + frozen MiniLM, fusion `{cfg.student.fusion}`, {cfg.train.epochs} epochs, "
            f"Adam lr {cfg.train.lr}, batch {cfg.train.batch_size}; KD: {kd}. Threshold chosen on val; test numbers.",
            "", demo_table(results), "", "![matching](matching.png)", ""]
    for name, d in details.items():
        c = d["counts"]
        text.append(f"- **{name}**: train/val/test pairs {c['train']['pairs']}/{c['val']['pairs']}/"
                    f"{c['test']['pairs']}; teacher errors on test: {d['teacher_errors']} (listed in "
                    f"`{name}/report.md`); {d['seconds']:.0f} s")
    text += ["", f"Total: {seconds:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(text))
