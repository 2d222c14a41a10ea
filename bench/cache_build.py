"""Is writing the bottleneck of ``mmkd cache``? Cache build throughput against the teacher's bare forward pass.

Bare forward: the teacher alone (``teacher_outputs``, same precision) on the very batches the builder forms (every
chunk's images for each of the K views, then every caption batch), with the pixels prepared beforehand and the
outputs discarded. Build: the whole ``build_cache`` call into a fresh folder (fingerprinting, pixel preparation
and augmentation, the teacher, conversion, atomic shard writes with fsync, commit markers). Ratio = bare forward
time / build time (= build throughput / forward throughput); target ≥ 0.9 for K = 1 and K = 4. Runs alternate
(forward, build, forward, build, ...) and the best of each is kept, so a busy machine penalises neither side.

Usage: python bench/cache_build.py [--teacher demo|b16] [--samples 1024] [--repeats 2] [--threads N]
                                   [--batch-size 64] [--chunk-rows 1024] [--json PATH]
Prints each measurement, then the ratios as the last lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_cost import _tokenizer, make_teacher, records  # noqa: E402

from mmkd.data.batches import ImageBank  # noqa: E402
from mmkd.teacher.cache import BuildSpec, build_cache, resolve_precision  # noqa: E402
from mmkd.teacher.targets import teacher_outputs  # noqa: E402


def forward_inputs(teacher: Any, recs: list, views: int, batch_size: int, chunk_rows: int
                   ) -> tuple[list[torch.Tensor], list[list[str]]]:
    """The builder's batches: per chunk, per view, per batch of images; then caption batches per chunk."""
    m = teacher.meta
    bank = ImageBank(recs, m.image_size, m.image_mean, m.image_std, augment=True, seed=0)
    pix = []
    for lo in range(0, len(recs), chunk_rows):
        hi = min(lo + chunk_rows, len(recs))
        for v in range(views):
            for s in range(lo, hi, batch_size):
                idx = list(range(s, min(s + batch_size, hi)))
                pix.append(bank.pixels(idx, [v] * len(idx)))
    caps = sorted({c for r in recs for c in r.captions})
    texts = []
    for lo in range(0, len(caps), chunk_rows):
        chunk = caps[lo:lo + chunk_rows]
        texts += [chunk[s:s + batch_size] for s in range(0, len(chunk), batch_size)]
    return pix, texts


def time_forward(teacher: Any, pix: list[torch.Tensor], texts: list[list[str]], bf16: bool) -> float:
    teacher.eval()
    t0 = time.perf_counter()
    for p in pix:
        teacher_outputs(teacher, p, None, bf16=bf16)
    for t in texts:
        teacher_outputs(teacher, None, t, bf16=bf16)
    return time.perf_counter() - t0


def time_build(teacher: Any, recs: list, views: int, out: Path, batch_size: int, chunk_rows: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    build_cache(teacher, recs, out, BuildSpec(views=views, dtype="float16", batch_size=batch_size,
                                              chunk_rows=chunk_rows))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", choices=["demo", "b16"], default="demo",
                    help="teacher shape (see bench/cache_cost.py); demo is the harder case: a fast teacher")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--views", default="1,4", help="comma list of K")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="mmkd-cache-build-") if args.work is None else None
    work = Path(tmp.name) if tmp is not None else args.work
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(args.teacher, _tokenizer())
    recs = records(args.samples, work)
    bf16 = resolve_precision("auto") == "bf16"
    ratios: dict[str, float] = {}
    details: dict[str, Any] = {"teacher": args.teacher, "samples": args.samples, "bf16": bf16,
                               "threads": torch.get_num_threads()}
    for k in (int(x) for x in args.views.split(",")):
        pix, texts = forward_inputs(teacher, recs, k, args.batch_size, args.chunk_rows)
        n_items = sum(len(p) for p in pix) + sum(len(t) for t in texts)
        fwd, bld = [], []
        for r in range(args.repeats):
            fwd.append(time_forward(teacher, pix, texts, bf16))
            bld.append(time_build(teacher, recs, k, work / f"cache-k{k}", args.batch_size, args.chunk_rows))
            print(f"K={k} repeat {r}: bare forward {fwd[-1]:.2f} s, build {bld[-1]:.2f} s "
                  f"({n_items} images+captions)", flush=True)
        ratios[f"build_over_forward_k{k}"] = min(fwd) / min(bld)
        details[f"k{k}"] = {"forward_s": fwd, "build_s": bld, "items": n_items,
                            "forward_items_per_s": n_items / min(fwd), "build_items_per_s": n_items / min(bld)}
        del pix, texts
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**ratios, "details": details}, indent=2))
    for k, v in ratios.items():
        d = details[k.replace("build_over_forward_", "")]
        print(f"{k}: {v:.3f} (target ≥ 0.9; forward {d['forward_items_per_s']:.0f} items/s, "
              f"build {d['build_items_per_s']:.0f} items/s)")
    if tmp is not None:
        tmp.cleanup()
    return ratios


if __name__ == "__main__":
    main()
