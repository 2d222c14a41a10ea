"""Does mmkd use a GPU as it should? One script, under 8 minutes on one GPU, for whenever a machine with one is at hand.

1. The demo student (configs/demo/student_cached.yaml's recipe, small data) trained from a teacher cache (the demo
   teacher's shape, seeded random weights; the cache built by ``mmkd cache --device``) on the device in fp32 and in
   bf16: the first-step loss must equal the same run's CPU first-step loss (fp32 within 2e-3 relative: cuDNN's
   TF32 convolutions; bf16 within 3e-2) and the loss must fall. The trained student is then evaluated zero-shot
   on the device and on the CPU (the two top-1s must agree within 2 points).
2. Student-step samples/s at batch 256 for a ViT-B/16-shaped CLIP student (random weights, 224 px), fp32 and
   bf16: forward, backward and AdamW step of the task ``mmkd distill`` trains, batches already on the device.
3. Cache-build images/s for a ViT-B/16-shaped teacher: ``mmkd cache --device`` over the built-in world.

Usage: python bench/gpu_check.py [--device cuda] [--json PATH] [--work DIR]
       python bench/gpu_check.py --device cpu --smoke   (tiny sizes: the whole path on a CPU, for the tests)
Without CUDA (and without --device cpu --smoke) it exits with status 2 and one line. Prints each measurement as it
goes, the figures last; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_cost import _tokenizer, make_teacher  # noqa: E402

DEMO_STUDENT = ROOT / "configs" / "demo" / "student_cached.yaml"
FP32_TOL, BF16_TOL, ZEROSHOT_TOL = 2e-3, 3e-2, 0.02


@dataclass(frozen=True)
class Sizes:
    world_train: int
    world_unpaired: int
    batch: int
    unpaired_batch: int
    steps: int
    zeroshot_images: int
    step_batch: int
    step_iters: int
    cache_images: int
    cache_batch: int
    shape: str  # the ViT-B/16-shaped models, or tiny ones


FULL = Sizes(world_train=512, world_unpaired=2048, batch=64, unpaired_batch=192, steps=60, zeroshot_images=1000,
             step_batch=256, step_iters=10, cache_images=4096, cache_batch=256, shape="b16")
SMOKE = Sizes(world_train=16, world_unpaired=16, batch=4, unpaired_batch=4, steps=3, zeroshot_images=16,
              step_batch=4, step_iters=2, cache_images=8, cache_batch=4, shape="tiny")


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------- models


def tiny_teacher(tok: Any) -> Any:
    """A dual encoder small enough for a CPU smoke run (MiniLM's tokenizer, random towers)."""
    from mmkd.models.dual_encoder import CLIP_MEAN, CLIP_STD, DualEncoder, EncoderMeta
    from mmkd.models.towers import build_tower

    torch.manual_seed(1234)
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    vision = build_tower("clip_vision", dict(common, image_size=32, patch_size=8))
    text = build_tower("bert", dict(common, vocab_size=len(tok), max_position_embeddings=64))
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="mean", image_size=32, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD, max_text_length=32)
    return DualEncoder(vision, text, 24, meta, tok)


def shaped_model(shape: str, tok: Any) -> Any:
    """ViT-B/16 + CLIP text (``b16``), the demo teacher's shape (``demo``), or a tiny model (``tiny``)."""
    return tiny_teacher(tok) if shape == "tiny" else make_teacher(shape, tok)


# ------------------------------------------------------------------------------------------------- 1. demo


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["loss"]) for r in rows if "loss" in r]


def demo_check(work: Path, device: str, sizes: Sizes, smoke: bool) -> dict[str, Any]:
    from mmkd.cli import main as mmkd
    from mmkd.config import EvalSpec, config_from_dict
    from mmkd.config_io import read_yaml
    from mmkd.eval.tasks import evaluate
    from mmkd.models.hub import load_dual_encoder, save_dual_encoder
    from mmkd.pipeline import run_distill

    tok = _tokenizer()
    teacher_dir = save_dual_encoder(shaped_model("tiny" if smoke else "demo", tok), work / "demo-teacher")
    base = read_yaml(DEMO_STUDENT)
    # the demo students' ViT, freshly initialised (the demo's inherit the teacher's layers; this check is about
    # devices, and a smoke run shrinks it below)
    base["student"]["vision"] = read_yaml(DEMO_STUDENT.with_name("scratch.yaml"))["student"]["vision"]
    base.update(teacher=f"cache:{work / 'demo-cache'}", cache_dir=str(work / "data"), eval=[])
    base["data"].update(world_size_train=sizes.world_train, world_size_unpaired=sizes.world_unpaired,
                        batch_size=sizes.batch, unpaired_batch_size=sizes.unpaired_batch)
    if smoke:  # a smaller vision tower (the text tower stays MiniLM's, frozen, as in the recipe)
        base["student"]["vision"]["config"].update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64)
    base["train"].update(steps=sizes.steps, warmup_steps=2, log_every=1, ckpt_every=0)
    cfg_file = work / "demo-student.yaml"
    cfg_file.write_text(json.dumps(base))
    t0 = time.perf_counter()
    rc = mmkd(["cache", "--config", str(cfg_file), "--teacher", str(teacher_dir), "--views", "2",
               "--device", device])
    if rc != 0:
        raise SystemExit(f"gpu_check: mmkd cache --device {device} failed (exit {rc})")
    log(f"demo: teacher cache built on {device} in {time.perf_counter() - t0:.1f} s")

    def run(name: str, where: str, precision: str, steps: int) -> tuple[list[float], float, Path]:
        cfg = config_from_dict(base, [f"out={work / name}", f"train.device={where}", f"train.precision={precision}",
                                      f"train.steps={steps}"])
        start = time.perf_counter()
        run_distill(cfg, log=lambda _: None, progress=False)
        seconds = time.perf_counter() - start
        losses = _losses(Path(cfg.out))
        log(f"demo: {name}: {steps} steps on {where} ({precision}) in {seconds:.1f} s; loss {losses[0]:.4f} → "
            f"{losses[-1]:.4f}")
        return losses, seconds, Path(cfg.out)

    cpu, _, _ = run("demo-cpu", "cpu", "fp32", 2)
    fp32, fp32_s, fp32_out = run("demo-fp32", device, "fp32", sizes.steps)
    bf16, bf16_s, _ = run("demo-bf16", device, "bf16", sizes.steps)

    def falls(losses: list[float]) -> bool:
        tail = losses[-max(1, len(losses) // 5):]
        return sum(tail) / len(tail) < losses[0]

    rel32 = abs(fp32[0] - cpu[0]) / abs(cpu[0])
    rel16 = abs(bf16[0] - cpu[0]) / abs(cpu[0])
    spec = [EvalSpec("zeroshot", "world:test", limit=sizes.zeroshot_images)]
    student = load_dual_encoder(fp32_out / "student")
    top1 = {}
    seconds = {}
    for where in (device, "cpu"):
        model = student.to(where)
        start = time.perf_counter()
        result = evaluate(model, spec, cache_dir=work / "data")
        sync(torch.device(where))
        seconds[where] = time.perf_counter() - start
        top1[where] = float(next(iter(result.values()))["top1"])
        log(f"demo: zero-shot world:test ({sizes.zeroshot_images} images) on {where}: top1 {top1[where]:.4f} "
            f"in {seconds[where]:.1f} s")
    return {
        "demo_first_loss_cpu": cpu[0], "demo_first_loss_fp32": fp32[0], "demo_first_loss_bf16": bf16[0],
        "demo_first_loss_rel_diff_fp32": rel32, "demo_first_loss_rel_diff_bf16": rel16,
        "demo_last_loss_fp32": fp32[-1], "demo_last_loss_bf16": bf16[-1],
        "demo_steps": sizes.steps, "demo_seconds_fp32": round(fp32_s, 2), "demo_seconds_bf16": round(bf16_s, 2),
        "zeroshot_top1_device": top1[device], "zeroshot_top1_cpu": top1["cpu"],
        "zeroshot_seconds_device": round(seconds[device], 2),
        "ok_first_loss_fp32": rel32 <= FP32_TOL, "ok_first_loss_bf16": rel16 <= BF16_TOL,
        "ok_losses_fall": falls(fp32) and falls(bf16),
        "ok_zeroshot_agrees": abs(top1[device] - top1["cpu"]) <= ZEROSHOT_TOL,
    }


# ------------------------------------------------------------------------------------------------- 2. step


def student_step(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Samples/s of the distillation task's training step (clip + an embedding-level feature term)."""
    import numpy as np
    import torch.nn.functional as F

    from mmkd.config import ObjectiveSpec
    from mmkd.data.batches import TrainBatch
    from mmkd.devices import autocast
    from mmkd.objectives.base import ObjectiveContext, build_objectives
    from mmkd.train.loop import param_groups
    from mmkd.train.task import DistillTask

    tok = _tokenizer()
    student = shaped_model(sizes.shape, tok)
    dim = student.projection_dim
    objectives = build_objectives([ObjectiveSpec("clip"), ObjectiveSpec("fd_mse_cosine")],
                                  ObjectiveContext(student_embed_dim=dim, teacher_embed_dim=dim), seed=0)
    task = DistillTask(student, objectives).to(device).train()
    b, size = sizes.step_batch, student.meta.image_size
    gen = torch.Generator().manual_seed(0)
    batch = TrainBatch(torch.randn(b, 3, size, size, generator=gen).to(device), [f"k{i}" for i in range(b)],
                       [0] * b, [f"a photo of a thing number {i}" for i in range(b)], b, np.arange(b), np.arange(0))
    targets = {k: F.normalize(torch.randn(b, dim, generator=gen), dim=-1).to(device)
               for k in ("image_embeds", "text_embeds")}
    out: dict[str, Any] = {"step_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1)}
    for precision in ("fp32", "bf16"):
        opt = torch.optim.AdamW(param_groups(task, 0.05), lr=1e-5)

        def step(opt: torch.optim.Optimizer = opt, precision: str = precision) -> None:
            with autocast(device, precision):
                loss = task(batch, targets)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):  # warm-up: kernels chosen, memory pools filled
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(sizes.step_iters):
            step()
        sync(device)
        rate = b * sizes.step_iters / (time.perf_counter() - start)
        out[f"student_step_samples_per_s_{precision}"] = round(rate, 1)
        if device.type == "cuda":
            out[f"student_step_peak_gib_{precision}"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        log(f"student step ({sizes.shape}, batch {b}, {precision}) on {device}: {rate:.1f} samples/s")
    return out


# ------------------------------------------------------------------------------------------------- 3. cache


def cache_build(work: Path, device: str, sizes: Sizes) -> dict[str, Any]:
    from mmkd.cache_command import run_cache
    from mmkd.cli import build_parser
    from mmkd.models.hub import save_dual_encoder

    teacher_dir = save_dual_encoder(shaped_model(sizes.shape, _tokenizer()), work / "step-teacher")
    args = build_parser().parse_args(["cache", "--teacher", str(teacher_dir), "--data", "world:pool",
                                      "--world-n", str(sizes.cache_images), "--data-cache", str(work / "data"),
                                      "--out", str(work / "b16-cache"), "--device", device,
                                      "--batch-size", str(sizes.cache_batch)])
    result = run_cache(args, log=lambda _: None)
    rate = result.n_samples * result.views / max(result.seconds, 1e-9)
    log(f"cache build ({sizes.shape} teacher, {result.n_samples} images) on {device}: {rate:.1f} images/s")
    return {"cache_build_images_per_s": round(rate, 1), "cache_build_images": result.n_samples}


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu with --smoke (default cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the whole path in seconds (tests, CPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    from mmkd.devices import DeviceError, resolve_device

    if not torch.cuda.is_available() and not (args.device == "cpu" and args.smoke):
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__}); run it where a GPU is, or "
              "pass --device cpu --smoke for a quick CPU run of the script itself", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device, "--device")
    except DeviceError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    name = str(device)
    t0 = time.perf_counter()
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "smoke": args.smoke}
    with (nullcontext(str(args.work)) if args.work else tempfile.TemporaryDirectory()) as folder:
        work = Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        figures.update(demo_check(work, name, sizes, args.smoke))
        figures.update(student_step(device, sizes))
        figures.update(cache_build(work, name, sizes))
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    figures["ok"] = all(v for k, v in figures.items() if k.startswith("ok_"))
    print()
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
