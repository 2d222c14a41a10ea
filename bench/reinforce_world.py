"""Dataset reinforcement on the built-in world, end to end: the leaderboard of ``configs/reinforce/world.yaml``.

Why a script: the leaderboard compares settings that each read teacher caches built once (one teacher or two,
K = 1 or 10 views, with or without RandAugment, with or without synthetic captions), and a second teacher and a
captioner must exist before those caches can. Each step is an ordinary mmkd command (printed before it runs), skipped
when its output is already complete, so an interrupted run continues where it stopped:

1. teacher A: the demo's (``runs/demo/teacher``, from ``make demo``), or trained with ``configs/demo/teacher.yaml``;
2. teacher B: the same recipe with ``train.seed=7`` (``mmkd distill … --resume-or-start``);
3. the captioner: ``python bench/world_captioner.py --encoder A`` (a small captioner of the world, trained here on
   teacher A's frozen vision tower);
4. the caches (``mmkd cache --config configs/reinforce/world.yaml …``), one per teacher and setting; the captioner
   runs in one build, the others embed its captions (``--captioner cache:DIR``), as captions do not depend on the
   teacher;
5. ``mmkd sweep configs/reinforce/world.yaml --seeds 3``;
6. the bytes per sample of every cache (``mmkd.teacher.cache.cache_size``) and the teachers' own zero-shot top-1,
   written with ``--json`` (default ``bench/results/reinforce_world.json``) for ``make readme`` (``tools/readme.py``).

Usage: python bench/reinforce_world.py [--seeds 3] [--teacher-a DIR] [--json PATH]   (writes under runs/reinforce)
Prints the leaderboard and the bytes per sample last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIG = "configs/reinforce/world.yaml"
WORK = Path("runs/reinforce")  # where the config's variants read their caches and write the sweep
N_SYNTHETIC = 5  # MobileCLIP's DataCompDR stores five synthetic captions per image
RANDAUGMENT = "2,9"  # RandAugment(num_ops=2, magnitude=9): torchvision's and MobileCLIP's defaults
CAPTIONED = "cache-a-k10-syn"  # the one build that runs the captioner; the others reuse its captions (cache:DIR)
# the caches the sweep's variants read: name → (teacher, views, RandAugment, synthetic captions)
CACHES: dict[str, tuple[str, int, bool, bool]] = {
    "cache-a-k1": ("a", 1, False, False),
    "cache-b-k1": ("b", 1, False, False),
    CAPTIONED: ("a", 10, False, True),
    "cache-a-k10-ra-syn": ("a", 10, True, True),
    "cache-b-k10-ra-syn": ("b", 10, True, True),
}


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def mmkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmkd.cli", *args]


def teacher_model(folder: Path) -> Path:
    """A run folder's saved model (``OUT/student``), or the folder itself where it holds the model."""
    return folder / "student" if (folder / "student" / "config.json").is_file() else folder


def setting_bytes(overrides: dict[str, Any], sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a setting reads, and the embedding bytes per sample a cache built for exactly that setting stores: its
    teachers' image embeddings for the views it draws, the real captions' and, where on, the synthetic captions'
    text embeddings (from the measured per-array bytes of the caches it reads, which may hold more views)."""
    teachers = overrides["teacher"] if isinstance(overrides["teacher"], list) else [overrides["teacher"]]
    names = [Path(t.removeprefix("cache:")).name for t in teachers]
    views = int(overrides.get("data.views") or 1)
    synthetic = bool((overrides.get("data.synthetic_captions") or {}).get("enabled"))
    total = 0.0
    for name in names:
        size = sizes[name]
        n = size["n_samples"]
        total += size["arrays"]["image_embeds"] / n * views / size["views"] + size["arrays"]["text_embeds"] / n
        if synthetic:
            total += size["arrays"]["syncap_embeds"] / n
    return {"caches": names, "views": views, "randaugment": "data.randaugment" in overrides,
            "synthetic_captions": synthetic, "embedding_bytes_per_sample": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher-a", default="runs/demo/teacher",
                    help="teacher A's model folder (default: the demo's; trained here when missing)")
    ap.add_argument("--seeds", default="3", help="seeds per setting (mmkd sweep --seeds)")
    ap.add_argument("--json", default="bench/results/reinforce_world.json")
    args = ap.parse_args()
    work = WORK
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    teacher_a = Path(args.teacher_a)
    if not (teacher_a / "config.json").is_file():
        teacher_a = work / "teacher_a"
        run(mmkd("distill", "configs/demo/teacher.yaml", f"out={teacher_a}", "--resume-or-start"))
    teacher_b = work / "teacher_b"
    if not (teacher_b / "metrics.json").is_file():
        run(mmkd("distill", "configs/demo/teacher.yaml", f"out={teacher_b}", "train.seed=7", "--resume-or-start"))
    teachers = {"a": teacher_model(teacher_a), "b": teacher_model(teacher_b)}
    captioner = work / "captioner"
    if not (captioner / "config.json").is_file():
        # its encoder is teacher A's vision tower, frozen: a fresh 32-px ViT learns shapes too slowly on a CPU
        run([sys.executable, "bench/world_captioner.py", "--encoder", str(teachers["a"]), "--steps", "2000",
             "--out", str(captioner), "--json", str(work / "captioner.json")])
    for name, (who, views, randaugment, synthetic) in CACHES.items():
        # a finished cache is a no-op to rebuild (every segment is committed); a killed one resumes
        run(mmkd("cache", "--config", CONFIG, "--teacher", str(teachers[who]), "--out", str(work / name),
                 "--views", str(views), *(["--randaugment", RANDAUGMENT] if randaugment else []),
                 *(["--captioner", str(captioner) if name == CAPTIONED else f"cache:{work / CAPTIONED}",
                    "--synthetic-captions", str(N_SYNTHETIC)] if synthetic else [])))
    run(mmkd("sweep", CONFIG, "--seeds", args.seeds))

    from mmkd.sweep_config import load_sweep_config
    from mmkd.teacher.cache import cache_size

    sizes = {name: cache_size(work / name).to_json() for name in CACHES}
    variants = load_sweep_config(CONFIG).sweep.variants
    settings = {name: setting_bytes(overrides, sizes) for name, overrides in variants.items()}
    out: dict[str, Any] = {
        "command": shlex.join(["python", "bench/reinforce_world.py", *sys.argv[1:]]),
        "seconds": round(time.perf_counter() - t0, 1),
        "caches": {name: {"teacher": who, "views": views, "randaugment": RANDAUGMENT if ra else None,
                          "synthetic_captions": N_SYNTHETIC if syn else 0, **sizes[name]}
                   for name, (who, views, ra, syn) in CACHES.items()},
        "settings": settings,
        "teachers": {},
        "captioner": json.loads((work / "captioner.json").read_text()) if (work / "captioner.json").is_file()
        else None,
    }
    for who, model in teachers.items():  # the teachers on the students' zero-shot test, for reference
        cmd = mmkd("eval", "zeroshot", "--model", str(model), "--data", "world:test", "--class-set", "colour_shape",
                   "--limit", "2000")
        print("$ " + shlex.join(cmd), flush=True)
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        out["teachers"][who] = {"model": str(model), "zeroshot": json.loads(text[text.index("{"):])["zeroshot"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    board = WORK / "sweep" / "leaderboard.md"
    if board.is_file():
        print(board.read_text())
    for name, info in out["caches"].items():
        print(f"{name}: {info}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
