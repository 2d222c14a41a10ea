"""What drives the demo's batch-1 image latency, measured cheaply: random weights, no training, one process.

The demo's speed-up (``speedup_b1`` in its metrics) is the *image* encoder's: pixels → embedding, teacher ViT
against student ViT. This script splits that latency into its parts and tries the knobs that could move it:
attention implementation (eager vs sdpa), grad mode (inference_mode vs no_grad vs neither), the fixed costs
outside the transformer layers (patch embedding, layernorms, pooling, projection, normalisation, the wrappers of
transformers' forward), intra-op threads (1 vs 2), and the depth of teacher and student. The text side (MiniLM's
6 layers against the students' 3) is timed too, so the report can say what each tower gains.

Why interleaved: the machine is shared and its load drifts. Each group's candidates are timed in rounds; in a
round every candidate runs ``--calls`` times (its median kept) in a rotated order, and a ratio is the median over
rounds of the per-round ratio, so a load change falls on both sides of it. FLOPs (FlopCounterMode) stand beside.

Usage: python bench/demo_latency.py [--rounds 15] [--calls 20] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

from mmkd.models.dual_encoder import DualEncoder, EncoderMeta

CLOCK_NAME = ["wall"]
VIT = dict(image_size=32, patch_size=8, hidden_size=256, num_attention_heads=4, intermediate_size=1024)


def dual(layers: int, attn: str = "sdpa") -> DualEncoder:
    """The demo's ViT (width 256, patch 8, 32 px) at ``layers`` layers with a token text tower: only images run."""
    torch.manual_seed(layers)
    vision = CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=layers, attn_implementation=attn, **VIT))
    text = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32,
                                vocab_size=64), add_pooling_layer=False)
    return DualEncoder(vision, text, 384, EncoderMeta(image_size=32, vision_pooling="pooler")).eval()


def image_gflops(model: DualEncoder) -> float:
    """GFLOPs of one image, counted as mmkd.eval.efficiency.flops counts them (its text half needs a tokenizer)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() / 1e9


CLOCK: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, n: int,
                mode: Callable[[], AbstractContextManager[Any]] = torch.inference_mode) -> dict[str, list[float]]:
    """Per candidate, its median ms per call in each round; rounds rotate the order the candidates run in.

    The clock is ``CLOCK[ARGS.clock]``: wall time, or this thread's CPU time (with one intra-op thread every op
    runs on the calling thread, so CPU time leaves out the time other processes hold the core)."""
    clock = CLOCK[CLOCK_NAME[0]]
    names = list(calls)
    out: dict[str, list[float]] = {k: [] for k in names}
    with mode():
        for fn in calls.values():  # warm-up
            for _ in range(3):
                fn()
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                times = []
                for _ in range(n):
                    t0 = clock()
                    calls[k]()
                    times.append(clock() - t0)
                out[k].append(1000 * statistics.median(times))
    return out


def summary(per_round: dict[str, list[float]], ratios: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Median ms per candidate and, for each named pair (slow, fast), the median of per-round slow/fast."""
    res: dict[str, Any] = {"ms": {k: round(statistics.median(v), 4) for k, v in per_round.items()}}
    res["ratio"] = {name: round(statistics.median(a / b for a, b in zip(per_round[s], per_round[f], strict=True)), 3)
                    for name, (s, f) in ratios.items()}
    return res


def parts(model: DualEncoder, pixels: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The image path's pieces, each on its own input, plus the whole as mmkd runs it and as bare calls."""
    v = model.vision_model
    with torch.inference_mode():
        emb = v.embeddings(pixels)
        h = v.pre_layrnorm(emb)
        cls = h[:, 0, :]
        feat = v.post_layernorm(cls)
        proj = model.visual_projection(feat)
    layer = v.encoder.layers[0]

    def bare() -> torch.Tensor:  # the same arithmetic without transformers' forward wrappers
        x = v.pre_layrnorm(v.embeddings(pixels))
        for block in v.encoder.layers:
            x = block(x, None)
        x = x[0] if isinstance(x, tuple) else x
        return model.visual_projection(v.post_layernorm(x[:, 0, :]))

    return {"embeddings (patch conv + positions)": lambda: v.embeddings(pixels),
            "pre_layernorm": lambda: v.pre_layrnorm(emb),
            "one encoder layer": lambda: layer(h, None),
            "post_layernorm on CLS": lambda: v.post_layernorm(cls),
            "projection": lambda: model.visual_projection(feat),
            "normalise": lambda: F.normalize(proj, dim=-1),
            "encode_image (as mmkd runs it)": lambda: model.encode_image(pixels),
            "bare calls (no HF wrappers)": bare}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher", default=None, help="a saved demo teacher folder: also time its text tower against "
                                                   "the students' (MiniLM layers 1, 3, 5)")
    p.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                   help="wall time, or the thread's CPU time (steadier on a loaded machine; with --threads 1)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    CLOCK_NAME[0] = a.clock
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    R, N = a.rounds, a.calls
    command = f"python bench/demo_latency.py --rounds {R} --calls {N} --threads {a.threads} --clock {a.clock}"
    res: dict[str, Any] = {"command": command + (f" --teacher {a.teacher}" if a.teacher else ""), "batch_size": 1}
    m = {L: dual(L) for L in (1, 2, 6, 8, 12)}
    res["gflops_per_image"] = {f"{L} layers": round(image_gflops(m[L]), 5) for L in m}

    def enc(model: DualEncoder) -> Callable[[], object]:
        return lambda: model.encode_image(px)

    # 1. depth: teachers of 6, 8, 12 layers against students of 2 and 1 layers
    res["depth"] = summary(interleaved({f"{L} layers": enc(m[L]) for L in m}, R, N),
                           {f"{t}→{s}": (f"{t} layers", f"{s} layers") for t in (6, 8, 12) for s in (2, 1)})
    print("depth", res["depth"], flush=True)
    # 2. attention: eager vs sdpa (mmkd's towers use sdpa, transformers' default)
    e = {L: dual(L, "eager") for L in (2, 6, 8)}
    cand = {f"{L} layers {k}": enc(mm[L]) for L in (2, 6, 8) for k, mm in (("sdpa", m), ("eager", e))}
    res["attention"] = summary(interleaved(cand, R, N), {
        **{f"eager/sdpa {L} layers": (f"{L} layers eager", f"{L} layers sdpa") for L in (2, 6, 8)},
        **{f"{t}→2 {k}": (f"{t} layers {k}", f"2 layers {k}") for t in (6, 8) for k in ("sdpa", "eager")}})
    print("attention", res["attention"], flush=True)
    # 3. grad mode: inference_mode (what mmkd's latency uses), no_grad, and neither
    modes: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad enabled": nullcontext}
    res["grad_mode"] = {}
    for name, mode in modes.items():
        res["grad_mode"][name] = summary(interleaved({f"{L} layers": enc(m[L]) for L in (2, 6, 8)}, R, N, mode),
                                         {"6→2": ("6 layers", "2 layers"), "8→2": ("8 layers", "2 layers")})
    print("grad_mode", res["grad_mode"], flush=True)
    # 4. fixed costs: the pieces of one image's path, student (2 layers) and teacher (6 layers)
    res["parts"] = {}
    for L in (2, 6):
        pr = interleaved(parts(m[L], px), R, N)
        s = summary(pr, {})
        ms = s["ms"]
        layers_ms = L * ms["one encoder layer"]
        pieces = layers_ms + sum(ms[k] for k in ("embeddings (patch conv + positions)", "pre_layernorm",
                                                 "post_layernorm on CLS", "projection"))
        s["layers_ms"] = round(layers_ms, 4)
        s["outside_layers_ms"] = round(ms["encode_image (as mmkd runs it)"] - layers_ms, 4)
        s["wrappers_ms"] = round(ms["encode_image (as mmkd runs it)"] - pieces, 4)
        res["parts"][f"{L} layers"] = s
    print("parts", res["parts"], flush=True)
    # 5. threads: 1 vs 2 intra-op threads (set between rounds, so the two settings alternate too); with --clock cpu
    # the process's CPU time, since a second thread's work is not the calling thread's
    CLOCK["cpu"] = time.process_time
    per: dict[str, list[float]] = {}
    for _ in range(R):
        for th in (1, 2):
            torch.set_num_threads(th)
            for k, v in interleaved({f"{L} layers": enc(m[L]) for L in (2, 6, 8)}, 1, N).items():
                per.setdefault(f"{k} {th} thread{'s' if th > 1 else ''}", []).extend(v)
    torch.set_num_threads(a.threads)
    CLOCK["cpu"] = time.thread_time
    res["threads"] = summary(per, {f"{d}→2 {t}": (f"{d} layers {t}", f"2 layers {t}")
                                   for d in (6, 8) for t in ("1 thread", "2 threads")})
    print("threads", res["threads"], flush=True)
    # 6. the text side, where a real demo teacher is given: MiniLM-L6 against its layers 1, 3, 5
    if a.teacher:
        from mmkd.models.hub import load_dual_encoder
        from mmkd.models.towers import shrink_tower

        t = load_dual_encoder(a.teacher).eval()
        small = shrink_tower(t.text_model, [1, 3, 5]).eval()
        tok = t.tokenize(["a small red circle on the left"])
        ids, mask = tok["input_ids"], tok["attention_mask"]
        res["text"] = summary(interleaved({
            "teacher text (6 layers)": lambda: t.encode_text(ids, mask),
            "student text (3 layers)": lambda: t.text_projection(small(input_ids=ids, attention_mask=mask)
                                                                  .last_hidden_state.mean(1))}, R, N),
            {"6→3": ("teacher text (6 layers)", "student text (3 layers)")})
        print("text", res["text"], flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
