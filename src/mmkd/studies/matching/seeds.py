"""The demo's students again per seed, KD with and without the transfer set (the config's ``seeds`` section).

These students are small: one seed (initialisation and batch order) moves a student's F1 by points, so a single
run cannot say whether KD beats the baseline. Each seed trains the baseline once (it never uses transfer
pairs) and every ``kd`` student with the labelled pairs only and with ``train.transfer`` unlabelled pairs per
labelled pair; the seed the demo itself ran with reuses the demo's students (same config, same result).
The records go to ``OUT/seeds.json``; the README's mean ± sd table is rendered from it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmkd.studies.matching.config import DemoConfig
from mmkd.studies.matching.metrics import summary
from mmkd.studies.matching.study import MatchingStudy


def transfer_sizes(cfg: DemoConfig) -> list[int]:
    """The transfer sizes a KD student is trained with per seed: 0 (S2: labelled pairs only) and the config's."""
    return sorted({0, cfg.train.transfer})


def seed_runs(study: MatchingStudy, cfg: DemoConfig, demo_models: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (seed, model, transfer size): test and val metrics; ``demo_models`` are the demo's own."""
    runs: list[dict[str, Any]] = []
    for seed in cfg.seeds.seeds:
        for kd in [None, *cfg.kd]:
            name = kd.name if kd is not None else "baseline"
            for transfer in [None] if kd is None else transfer_sizes(cfg):
                reused = seed == cfg.train.seed and (kd is None or transfer == cfg.train.transfer)
                if reused:
                    r = demo_models[name]
                else:
                    train = replace(cfg.train, seed=seed, transfer=transfer or 0)
                    label = f"{name} seed {seed}" + ("" if transfer is None else f" transfer {transfer}")
                    r = study.run_student(kd, label, train)
                runs.append({"seed": seed, "model": name, "transfer": transfer, "reused": reused,
                             "val": summary(r["val"]), "test": summary(r["test"]),
                             "train_seconds": r.get("train_seconds")})
    return runs
