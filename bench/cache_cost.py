"""What a teacher cache saves: the same student, data, batch and steps, each mode in its own fresh process.

Modes: (a) ``plain``: the student alone (contrastive loss); (b) ``online``: KD with the teacher run on every batch
(frozen, under inference_mode, in bfloat16 where the CPU supports it; ``online_fp32`` also in float32);
(c) ``cached``: KD with the teacher's embeddings read from a cache built beforehand (``mmkd.teacher.cache``);
(d) ``cached_ensemble_k10``: KD from a two-teacher ensemble's caches (the teacher's shape drawn with two seeds),
K=10 views each, looked up together (``mmkd.teacher.ensemble``), fd_mse_cosine once per teacher (MobileCLIP's
dataset-reinforcement setting). KD = contrastive + fd_mse_cosine on both towers, with K=2 augmented views replayed
exactly (K=10 in (d)).

Student: S3's (ViT 6 layers, width 256, patch 4, 32 px) plus a 4-layer width-256 text tower (MiniLM vocabulary).
Teachers (random weights; cost does not depend on them): CLIP ViT-B/16's real shape (224 px, patch 16, 12 layers
width 768; text tower 12 layers width 512, 49,408-token vocabulary: 149.6M parameters), and the demo teacher's
shape (``configs/demo/teacher.yaml`` as it starts: ViT 6L/256 patch 8 at 32 px + the real all-MiniLM-L6-v2), prefix
``demo_``.

Time: median step (data, teacher targets, forward, backward, AdamW) after warm-up steps; plain and cached, whose
ratio must be measured to a few percent, run ``--repeats`` times alternating, each in a fresh process, and their
figures are the median over all those steps (memory: the median of the processes' figures). Memory: peak RSS above
the process's own baseline taken after imports and data loading (``VmHWM - baseline``), and the raw peak.
Subprocesses get ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc): large buffers are then returned to the OS instead of
growing the heap, which the prototype found cuts allocator growth and makes the memory figures comparable.

Usage: python bench/cache_cost.py [--steps 10] [--warmup 2] [--repeats 3] [--batch 64] [--samples 256] [--threads N]
                                  [--teachers b16,demo] [--dtype float16|int8|…] [--work DIR] [--json PATH]
Prints each mode's figures, then the ratios; the ensemble's time ratio over plain is the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procstat import status_kb  # bench/: sys.path[0] when a benchmark runs as a script

VIEWS = 2
ENSEMBLE_VIEWS = 10
SEED = 0
MODES = ("plain", "cached", "cached_ensemble_k10", "online_bf16", "online_fp32")
ENSEMBLE_SEEDS = (1234, 4321)  # the two members: the teacher's shape with weights drawn from each seed
DEMO_TEACHER = Path(__file__).resolve().parents[1] / "configs" / "demo" / "teacher.yaml"




# ------------------------------------------------------------------------------------------ models and data


def _tokenizer() -> Any:
    from mmkd.models.hub import MINILM, load_tokenizer

    return load_tokenizer(MINILM)


def make_teacher(shape: str, tok: Any, seed: int = 1234) -> Any:
    """The teacher of ``shape`` with seeded random weights (the same in every process)."""
    import torch

    from mmkd.models.dual_encoder import CLIP_MEAN, CLIP_STD, DualEncoder, EncoderMeta
    from mmkd.models.towers import build_tower

    if shape == "demo":
        from mmkd.config import load_config
        from mmkd.models.student import build_student

        return build_student(None, load_config(DEMO_TEACHER).student, seed=seed)
    torch.manual_seed(seed)
    vision = build_tower("clip_vision", dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                             num_attention_heads=12, intermediate_size=3072))
    text = build_tower("clip_text", dict(vocab_size=49408, hidden_size=512, num_hidden_layers=12,
                                         num_attention_heads=8, intermediate_size=2048, max_position_embeddings=77,
                                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="pooler", image_size=224, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD, max_text_length=77)
    return DualEncoder(vision, text, 512, meta, tok)


def make_student(tok: Any) -> Any:
    import torch

    from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
    from mmkd.models.towers import build_tower

    torch.manual_seed(5)
    vision = build_tower("clip_vision", dict(image_size=32, patch_size=4, hidden_size=256, num_hidden_layers=6,
                                             num_attention_heads=4, intermediate_size=1024))
    text = build_tower("bert", dict(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=1024, max_position_embeddings=64))
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="mean", image_size=32, image_mean=(0.5, 0.5, 0.5),
                       image_std=(0.25, 0.25, 0.25), max_text_length=32)
    return DualEncoder(vision, text, 256, meta, tok)


def records(n: int, work: Path) -> list:
    from mmkd.data import world

    return world.to_records(world.load_split("train", n, work / "world"))


# ------------------------------------------------------------------------------------------------- workers


def _cache_name(args: argparse.Namespace) -> str:
    """The cache folder of a teacher shape and storage type (one --work can hold both dtypes' caches)."""
    return f"cache-{args.shape}" + ("" if args.dtype == "float16" else f"-{args.dtype}")


def build_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the cache of ``args.shape`` (in its own process too, so the parent stays small)."""
    import torch

    from mmkd.teacher.cache import BuildSpec, build_cache

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = _tokenizer()
    seed, views, name = 1234, VIEWS, _cache_name(args)
    if args.mode.startswith("ensemble"):  # ensemble0, ensemble1: the members of the K=10 ensemble
        member = int(args.mode[len("ensemble"):])
        seed, views, name = ENSEMBLE_SEEDS[member], ENSEMBLE_VIEWS, f"{_cache_name(args)}-ensemble{member}"
    teacher = make_teacher(args.shape, tok, seed)
    recs = records(args.samples, Path(args.work))
    res = build_cache(teacher, recs, Path(args.work) / name, BuildSpec(views=views, seed=SEED, dtype=args.dtype,
                                                                       batch_size=64, chunk_rows=256))
    return {"seconds": res.seconds, "built": res.chunks_built, "params": sum(p.numel() for p in teacher.parameters())}


def step_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode: time ``steps`` training steps after ``warmup``; report times and memory."""
    import torch

    from mmkd.config import ObjectiveSpec
    from mmkd.data.batches import ImageBank, TrainData
    from mmkd.models.towers import tower_widths
    from mmkd.objectives.base import ObjectiveContext, build_objectives
    from mmkd.teacher.cache import CachedTeacher, CacheExpectation
    from mmkd.teacher.ensemble import EnsembleLookup, check_agreement
    from mmkd.teacher.targets import OnlineTeacher, bf16_supported
    from mmkd.train.loop import param_groups
    from mmkd.train.task import DistillTask

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = _tokenizer()
    recs = records(args.samples, Path(args.work))
    cache_dir = Path(args.work) / _cache_name(args)
    aug = CachedTeacher.open(cache_dir).augmentation  # the same views in every mode
    bank = ImageBank(recs, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True, seed=SEED, augmentation=aug)
    ensemble = args.mode == "cached_ensemble_k10"
    data = TrainData(bank, None, args.batch, 0, world=1, seed=1, views=ENSEMBLE_VIEWS if ensemble else VIEWS)
    baseline_kb = status_kb("VmRSS")  # after imports and data loading

    student = make_student(tok)
    kd = args.mode != "plain"
    teacher: Any = None
    contexts = None
    if args.mode == "cached":
        teacher = CachedTeacher.open(cache_dir, expect=CacheExpectation.for_data(data))
        t_dim, t_feats = teacher.embed_dim, teacher.feature_dims
    elif ensemble:  # both members' targets for every batch, as the DataLoader workers look them up in training
        caches = [CachedTeacher.open(Path(args.work) / f"{_cache_name(args)}-ensemble{i}",
                                     expect=CacheExpectation.for_data(data)) for i in range(len(ENSEMBLE_SEEDS))]
        check_agreement(caches)
        teacher = EnsembleLookup(caches)
        t_dim, t_feats = caches[0].embed_dim, caches[0].feature_dims
        contexts = [ObjectiveContext(student.projection_dim, c.embed_dim, tower_widths(student), c.feature_dims)
                    for c in caches]
    elif kd:
        model = make_teacher(args.shape, tok)
        t_bank = ImageBank(recs, model.meta.image_size, model.meta.image_mean, model.meta.image_std, augment=True,
                           seed=SEED, augmentation=aug)
        bf16 = args.mode == "online_bf16"
        if bf16 and not bf16_supported():
            return {"skipped": "this CPU has no fast bfloat16"}
        teacher = OnlineTeacher(model, t_bank, bf16=bf16)
        t_dim, t_feats = model.projection_dim, tower_widths(model)
    specs = [ObjectiveSpec("clip")] + ([ObjectiveSpec("fd_mse_cosine", towers=["image", "text"])] if kd else [])
    ctx = ObjectiveContext(student.projection_dim, t_dim if kd else None, tower_widths(student),
                           t_feats if kd else {})
    task = DistillTask(student, build_objectives(specs, contexts or ctx))
    opt = torch.optim.AdamW(param_groups(task, 0.05), lr=1e-4)
    task.train()
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = data.batch(step)
        targets = teacher(batch) if teacher is not None else {}
        terms = task(batch, targets)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_kb = status_kb("VmHWM")
    return {"step_s": statistics.median(times), "times": [round(t, 4) for t in times],
            "baseline_mb": baseline_kb / 1024, "peak_mb": peak_kb / 1024, "above_mb": (peak_kb - baseline_kb) / 1024}


# ------------------------------------------------------------------------------------------------- parent


def _run(worker: str, shape: str, args: argparse.Namespace, mode: str = "") -> dict[str, Any]:
    env = dict(os.environ)
    if not args.no_malloc_tuning:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, __file__, "--worker", worker, "--shape", shape, "--mode", mode or "-", "--work",
           str(args.work), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--samples", str(args.samples), "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads
                                                                      else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} {shape} {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes each for plain and cached, alternating")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=256, help="training images (epochs repeat over them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every mode (default: torch's)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32", "int8"],
                    help="storage type of the caches (c) and (d) read (int8: dequantised in the lookup)")
    ap.add_argument("--teachers", default="b16,demo", help="comma list of b16, demo")
    ap.add_argument("--work", type=Path, default=None, help="folder for the world data and caches (default: temp)")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="do not set MALLOC_MMAP_THRESHOLD_")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="b16", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="-", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out = build_worker(args) if args.worker == "build" else step_worker(args)
        print(json.dumps(out))
        return {}
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmkd-cache-cost-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    ratios: dict[str, float] = {}
    details: dict[str, Any] = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "batch": args.batch,
                               "samples": args.samples, "views": VIEWS, "threads": args.threads, "dtype": args.dtype,
                               "malloc_mmap_threshold": None if args.no_malloc_tuning else 131072}
    lines = []
    for shape in args.teachers.split(","):
        prefix = "" if shape == "b16" else f"{shape}_"
        built = _run("build", shape, args)
        print(f"[{shape}] cache built in {built['seconds']:.1f} s (teacher {built['params'] / 1e6:.1f}M parameters)",
              flush=True)
        res = {}
        # plain and cached alternate over --repeats fresh processes: their ratio is near 1 and a single process's
        # speed drifts by ±10% here (memory layout, neighbours), more than the 5% being measured
        for member in range(len(ENSEMBLE_SEEDS)):
            b = _run("build", shape, args, f"ensemble{member}")
            print(f"[{shape}] ensemble member {member} cache ({ENSEMBLE_VIEWS} views) built in {b['seconds']:.1f} s",
                  flush=True)
        paced = ("plain", "cached", "cached_ensemble_k10")
        rounds = [list(paced)] * args.repeats + [[m for m in MODES if m not in paced]]
        for mode in [m for r in rounds for m in r]:
            r = _run("step", shape, args, mode)
            if "skipped" in r:
                res[mode] = r
                print(f"[{shape}] {mode:12s} skipped: {r['skipped']}", flush=True)
                continue
            print(f"[{shape}] {mode:12s} step {r['step_s']:.3f} s (median of {args.steps}), memory above baseline "
                  f"{r['above_mb']:.0f} MB, raw peak {r['peak_mb']:.0f} MB (baseline {r['baseline_mb']:.0f} MB)",
                  flush=True)
            res.setdefault(mode, {"runs": []})["runs"].append(r)
        for m in res.values():
            if "runs" in m:  # over all processes: the median step of all their steps, the median of their memory
                m["step_s"] = statistics.median(t for r in m["runs"] for t in r["times"])
                m["above_mb"] = statistics.median(r["above_mb"] for r in m["runs"])
                m["peak_mb"] = statistics.median(r["peak_mb"] for r in m["runs"])
        for mode in paced:
            m = res[mode]
            print(f"[{shape}] {mode:12s} over {args.repeats} processes: step {m['step_s']:.3f} s, memory above "
                  f"baseline {m['above_mb']:.0f} MB", flush=True)
        online = res["online_bf16"] if "skipped" not in res["online_bf16"] else res["online_fp32"]
        c, a, f = res["cached"], res["plain"], res["online_fp32"]
        ratios[f"{prefix}cached_over_plain_time"] = c["step_s"] / a["step_s"]
        ratios[f"{prefix}cached_over_plain_memory"] = c["above_mb"] / a["above_mb"]
        ratios[f"{prefix}online_over_cached_time"] = online["step_s"] / c["step_s"]
        ratios[f"{prefix}online_fp32_over_cached_time"] = f["step_s"] / c["step_s"]
        ratios[f"{prefix}online_over_cached_memory"] = online["above_mb"] / c["above_mb"]
        e = res["cached_ensemble_k10"]
        ratios[f"{prefix}cached_ensemble_k10_over_plain_memory"] = e["above_mb"] / a["above_mb"]
        ratios[f"{prefix}cached_ensemble_k10_over_plain_time"] = e["step_s"] / a["step_s"]
        details[shape] = {"teacher_params": built["params"], "cache_build_s": built["seconds"], "modes": res}
        lines.append((shape, prefix))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**ratios, "details": details}, indent=2))
    for shape, prefix in lines:
        print(f"[{shape}] cached/plain time {ratios[f'{prefix}cached_over_plain_time']:.3f} (target ≤ 1.05), memory "
              f"{ratios[f'{prefix}cached_over_plain_memory']:.3f} (target ≤ 1.05); online/cached time "
              f"{ratios[f'{prefix}online_over_cached_time']:.2f}× (bf16; target ≥ 5 for b16), fp32 "
              f"{ratios[f'{prefix}online_fp32_over_cached_time']:.2f}×, memory "
              f"{ratios[f'{prefix}online_over_cached_memory']:.2f}×")
    for shape, prefix in lines:
        print(f"[{shape}] cached_ensemble_k10/plain time {ratios[f'{prefix}cached_ensemble_k10_over_plain_time']:.3f} "
              f"(target ≤ 1.05), memory {ratios[f'{prefix}cached_ensemble_k10_over_plain_memory']:.3f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if tmp is not None:
        tmp.cleanup()
    return ratios


if __name__ == "__main__":
    main()
