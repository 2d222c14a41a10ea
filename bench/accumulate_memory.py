"""What exact accumulation saves: ``train.accumulate: 8`` of 32 against one batch of 256, the same 256-sample loss
(clip + fd_mse_cosine, GradCache-style: `mmkd.train.accumulate`), on the demo's student
(``configs/demo/student_cached.yaml``: a 3-layer clip_vision at 32 px, MiniLM's text tower shrunk to 3 layers and
frozen), on the CPU in fp32.

Each mode runs in its own fresh process (peak RSS, ``VmHWM``, is per process), alternating batch / accumulate
for ``--repeats`` rounds: peak RSS raw and above the process's baseline (after imports, the student and the
data are in memory, before the first step), seconds per step (after one warm-up step), and the first step's
logged loss (equal in both modes: the same 256-sample loss). Keys: ``peak_ratio`` (accumulate / batch, raw peak
RSS, best round of each), ``above_baseline_ratio`` (the same above the baseline: the training step's own memory),
``step_time_ratio`` and ``step_cpu_ratio`` (CPU seconds: robust to a busy machine).

Usage: python bench/accumulate_memory.py [--repeats 2] [--steps 3] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from procstat import status_kb  # bench/: sys.path[0] when a benchmark runs as a script

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDENT = ROOT / "configs" / "demo" / "student_cached.yaml"
MEASURED_VISION = dict(image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=512)
GLOBAL_BATCH = 256
PROJECTION_DIM = 384  # configs/demo/teacher.yaml
MODES = {"batch": (1, 256), "accumulate": (8, 32)}  # (micro-batches, micro-batch size)


def worker(mode: str, steps: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mmkd.config import ObjectiveSpec, TowerSpec, load_config
    from mmkd.data.batches import TrainBatch
    from mmkd.models.student import build_student, feature_widths
    from mmkd.objectives.base import ObjectiveContext, build_objectives
    from mmkd.train.accumulate import accumulated_backward
    from mmkd.train.loop import param_groups
    from mmkd.train.task import DistillTask, text_is_frozen, train_mode

    torch.set_num_threads(threads)
    spec = load_config(DEMO_STUDENT).student  # its width comes from the teacher (cached): the demo teacher's
    # the ViT the recorded results were measured with (the demo's student then): the demo's students now inherit
    # the teacher's layers, which a student built without a teacher cannot
    spec = replace(spec, vision=TowerSpec(source="new", arch="clip_vision", config=MEASURED_VISION))
    student = build_student(None, replace(spec, projection_dim=PROJECTION_DIM), seed=0)
    dim = student.projection_dim
    objectives = build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse_cosine")],
                                  ObjectiveContext(dim, dim, feature_widths(student), {}), seed=0)
    task = DistillTask(student, objectives)
    train_mode(task, text_is_frozen(student))  # as train() runs it: the frozen text tower without dropout
    opt = torch.optim.AdamW(param_groups(task, 0.1), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    words = ["red", "green", "blue", "circle", "square", "star", "small", "large", "top", "left"]
    k, b = MODES[mode]
    batches = []
    for step in range(steps + 1):
        pixels = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
        caps = [f"a {words[(i + step) % 10]} {words[(3 * i) % 10]} number {i}" for i in range(GLOBAL_BATCH)]
        t = {"image_embeds": F.normalize(torch.randn(GLOBAL_BATCH, dim, generator=g), dim=-1),
             "text_embeds": F.normalize(torch.randn(GLOBAL_BATCH, dim, generator=g), dim=-1)}
        micros = []
        for m in range(k):
            s = slice(m * b, (m + 1) * b)
            micros.append((TrainBatch(pixels[s], [str(i) for i in range(b)], [0] * b, caps[s], b, np.arange(b),
                                      np.arange(0)), {key: v[s] for key, v in t.items()}))
        batches.append(micros)
    baseline_kb = status_kb("VmRSS")
    losses, times, cpu = [], [], []
    for micros in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        terms = accumulated_backward(task, micros, "fp32", torch.device("cpu"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(terms["loss"]))
    peak_kb = status_kb("VmHWM")
    return {"mode": mode, "micro_batches": k, "micro_batch": b, "baseline_mb": baseline_kb / 1024,
            "peak_mb": peak_kb / 1024, "above_baseline_mb": (peak_kb - baseline_kb) / 1024,
            "step_s": sum(times[1:]) / max(1, len(times) - 1), "step_cpu_s": sum(cpu[1:]) / max(1, len(cpu) - 1),
            "first_loss": losses[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads)))
        return
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:  # side by side: batch, accumulate, batch, accumulate, …
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"accumulate_memory: the {mode} worker failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(res)
            print(f"round {r + 1} {mode:>10} ({res['micro_batches']} x {res['micro_batch']}): peak RSS "
                  f"{res['peak_mb']:.0f} MB ({res['above_baseline_mb']:.0f} MB above baseline), "
                  f"{res['step_s']:.2f} s/step ({res['step_cpu_s']:.2f} s CPU), first loss {res['first_loss']:.6f}",
                  flush=True)
    best = {m: min(rs, key=lambda x: x["peak_mb"]) for m, rs in runs.items()}
    a, b = best["accumulate"], best["batch"]
    result = {"settings": {"student": str(DEMO_STUDENT.relative_to(ROOT)), "global_batch": GLOBAL_BATCH,
                           "objectives": "clip + fd_mse_cosine", "steps": args.steps, "repeats": args.repeats,
                           "threads": args.threads, "device": "cpu", "precision": "fp32"},
              "runs": runs, "best": best,
              "peak_ratio": a["peak_mb"] / b["peak_mb"],
              "above_baseline_ratio": a["above_baseline_mb"] / b["above_baseline_mb"],
              "step_time_ratio": min(x["step_s"] for x in runs["accumulate"]) / min(x["step_s"] for x in runs["batch"]),
              "step_cpu_ratio": (min(x["step_cpu_s"] for x in runs["accumulate"])
                                 / min(x["step_cpu_s"] for x in runs["batch"])),
              "first_loss_rel_diff": abs(a["first_loss"] - b["first_loss"]) / abs(b["first_loss"])}
    print(f"peak RSS accumulate 8 x 32 / batch 256: {result['peak_ratio']:.3f} (above baseline: "
          f"{result['above_baseline_ratio']:.3f}); step time ratio {result['step_time_ratio']:.2f} (CPU time "
          f"{result['step_cpu_ratio']:.2f}); first losses "
          f"differ by {result['first_loss_rel_diff']:.1e} (relative)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
