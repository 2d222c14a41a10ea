"""``mmkd matching demo CONFIG``: the matching study end to end on each pairs set of the config's ``settings``.

For each setting: build the pairs → fine-tune the teacher's matcher (once; its logits cached) → train the
baseline student (BCE) → train the KD students from the same initialisation and batch order, each labelled
pair joined by ``train.transfer`` unlabelled ones scored by the teacher (its image with other training
captions: the transfer set). Writes ``OUT/matching.json`` (test metrics per setting and model),
``OUT/report.md`` (the table), ``OUT/matching.png``, ``OUT/demo.json`` and one study folder per setting; with a
``seeds`` section, also ``OUT/seeds.json`` (the students again per seed, see ``seeds.py``).

Every data set a setting names is checked before any training: a missing one fails in one line that says how
to drop the setting (``settings.NAME=null``). Budgets live in ``configs/matching/demo.yaml``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mmkd.config_io import to_dict
from mmkd.data.records import DataError
from mmkd.fileio import atomic_write_json, atomic_write_text
from mmkd.studies.matching.config import DemoConfig, DemoSetting
from mmkd.studies.matching.data import load_pair_data
from mmkd.studies.matching.metrics import summary
from mmkd.studies.matching.pairfile import build_pairs_file
from mmkd.studies.matching.pretrain import check_teacher, teacher_source
from mmkd.studies.matching.report import demo_table, plot_demo, seeds_table
from mmkd.studies.matching.seeds import seed_runs, transfer_sizes
from mmkd.studies.matching.study import MatchingStudy


def check_settings_data(settings: dict[str, DemoSetting], cache: Path) -> None:
    """Read every on-disk data set the settings name, so a missing one fails before minutes of training."""
    from mmkd.data.resolve import records_from_spec

    for name, s in settings.items():
        if s.data.startswith("world:"):
            continue  # generated on demand
        try:
            records_from_spec(s.data, cache)
        except (DataError, FileNotFoundError) as e:
            raise DataError(f"settings.{name}.data: {e}; point it at the data or drop this setting with "
                            f"settings.{name}=null") from None


def setting_study(cfg: DemoConfig, name: str, s: DemoSetting, teacher_dir: Path, encoder: Any,
                  log: Any = print) -> tuple[MatchingStudy, Path, dict[str, Any]]:
    """One setting's pairs (built once into ``OUT/pairs/NAME.jsonl``) and its study in ``OUT/NAME``: the demo's
    path, also taken by studies that train more students on the same pairs and teacher (bench/matching_hard.py)."""
    out, cache = Path(cfg.out), cfg.cache
    is_world = s.data.startswith("world:")
    build = replace(cfg.pairs.build, negatives=s.negatives,
                    hard_candidates=s.hard_candidates or ("drawn" if is_world else "all"))
    pairs_path, counts = build_pairs_file(s.data, out / "pairs" / f"{name}.jsonl", build, cache_dir=cache,
                                          world_n=s.world_n, embed=encoder)
    encoder.save_cache()
    log(f"pairs: {pairs_path} " + ", ".join(f"{k} {c['pairs']}" for k, c in counts.items()))
    study = MatchingStudy(load_pair_data(pairs_path, cache), teacher_dir, out / name, cfg, log=log,
                          text_encoder=encoder)
    return study, pairs_path, counts


def run_matching_demo(cfg: DemoConfig, quick: bool = False, log: Any = print) -> dict[str, Any]:
    settings = cfg.setting_list()
    seeded = cfg.seed_settings()
    out, cache = Path(cfg.out), cfg.cache
    check_teacher(cfg)
    check_settings_data(settings, cache)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    teacher_dir = teacher_source(cfg, log)
    from mmkd.studies.matching.text import TextEncoder

    encoder = TextEncoder(cfg.text_encoder, cache_file=cache / "text-features.npz")
    results: dict[str, dict[str, dict[str, float]]] = {}
    details: dict[str, Any] = {}
    seeds: dict[str, Any] = {}
    for name, s in settings.items():
        log(f"\n== {name}: {s.data}, {s.negatives} negatives ==")
        study, pairs_path, counts = setting_study(cfg, name, s, teacher_dir, encoder, log)
        metrics = study.run()
        results[name] = {m: summary(r["test"]) for m, r in metrics["models"].items()}
        details[name] = {"pairs": str(pairs_path), "counts": counts,
                         "thresholds": {m: r["test"]["threshold"] for m, r in metrics["models"].items()},
                         "seconds": metrics["seconds"], "teacher_errors": len(metrics["teacher_errors"])}
        if name in seeded:
            t1 = time.perf_counter()
            log(f"\n== {name}: the students again with seeds {cfg.seeds.seeds} ==")
            seeds[name] = {"teacher": results[name]["teacher"], "runs": seed_runs(study, cfg, metrics["models"]),
                           "seconds": round(time.perf_counter() - t1, 1)}
    encoder.save_cache()
    atomic_write_json(out / "matching.json", results)
    seed_record = {"seeds": cfg.seeds.seeds, "transfer": transfer_sizes(cfg), "kd": [k.name for k in cfg.kd],
                   "settings": seeds}
    if seeds:
        atomic_write_json(out / "seeds.json", seed_record)
    plot_demo(results, out / "matching.png")
    seconds = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "demo.json", {"quick": quick, "teacher": str(teacher_dir), "settings": details,
                                          "config": to_dict(cfg), "seconds": seconds})
    _write_report(out, results, details, cfg, teacher_dir, seconds, seed_record if seeds else None)
    return results


def _write_report(out: Path, results: dict[str, Any], details: dict[str, Any], cfg: DemoConfig,
                  teacher_dir: Path, seconds: float, seeds: dict[str, Any] | None) -> None:
    kd = ", ".join(f"{k.variant} T={k.temperature} α={k.alpha}" for k in cfg.kd)
    kd += f"; {cfg.train.transfer} teacher-scored unlabelled pairs per labelled pair" if cfg.train.transfer else ""
    text = ["# Binary image–text matching demo (the matching study)", "",
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
    if seeds:
        text += ["", f"## Over seeds {', '.join(map(str, seeds['seeds']))} (test F1, mean ± sd; `seeds.json`)", "",
                 seeds_table(seeds)]
    text += ["", f"Total: {seconds:.0f} s.", ""]
    atomic_write_text(out / "report.md", "\n".join(text))
