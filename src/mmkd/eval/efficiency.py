"""Size, compute, speed and memory of a dual encoder: the other half of a distillation trade-off."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmkd.errors import UsageError
from mmkd.eval.embed import eval_mode, model_device_dtype

DEFAULT_CAPTION = "a small red circle on the left"


def _unique_numel(modules: Iterable[nn.Module | None]) -> int:
    """Parameter count over several modules, each tensor counted once even if shared or tied."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per tower: image = vision_model + visual_projection, text = text_model + text_projection.

    "total" counts every parameter of the model once, so weights shared between towers (or extra modules
    such as a logit scale) make it differ from image + text.
    """
    return {
        "image": _unique_numel([model.vision_model, getattr(model, "visual_projection", None)]),
        "text": _unique_numel([model.text_model, getattr(model, "text_projection", None)]),
        "total": _unique_numel([model]),
    }


def _random_pixels(model: nn.Module, batch_size: int) -> torch.Tensor:
    """Random input of the model's size from a private generator, so global RNG state is left alone."""
    device, dtype = model_device_dtype(model)
    gen = torch.Generator().manual_seed(0)
    size = int(model.image_size)
    return torch.randn(batch_size, 3, size, size, generator=gen).to(device=device, dtype=dtype)


def _tokens(model: nn.Module, caption: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    device, _ = model_device_dtype(model)
    tok = model.tokenize([caption] * batch_size)
    return tok["input_ids"].to(device), tok["attention_mask"].to(device)


def flops(model: nn.Module, batch_size: int = 1, caption: str = DEFAULT_CAPTION) -> dict[str, float]:
    """GFLOPs per image and per caption (one multiply-add = 2 FLOPs), counted by FlopCounterMode.

    Only ops FlopCounterMode knows (matmuls, convolutions, attention) are counted; elementwise work, norms and
    embedding look-ups are not, as is usual for reported model FLOPs. Tokenisation is excluded.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    pixels = _random_pixels(model, batch_size)
    ids, mask = _tokens(model, caption, batch_size)
    with eval_mode(model), torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.encode_image(pixels)
        image = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.encode_text(ids, mask)
        text = counter.get_total_flops()
    return {"image_gflops": image / batch_size / 1e9, "text_gflops": text / batch_size / 1e9}


def _time_call(fn: Callable[[], object], repeats: int, warmup: int, budget_s: float, sync: bool
               ) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of the calling thread per call; stops early once ``budget_s`` is
    spent (always at least one timed call). With one intra-op thread every op runs on the calling thread, so its
    CPU time is the call's work without the time other processes held the core (see `paired_speedup`)."""
    deadline = time.perf_counter() + budget_s
    for _ in range(warmup):
        fn()
        if time.perf_counter() > deadline:
            break
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(max(1, repeats)):
        if sync:
            torch.cuda.synchronize()
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        if time.perf_counter() > deadline:
            break
    return statistics.median(wall), statistics.median(cpu)


def latency(
    model: nn.Module,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 10,
    warmup: int = 2,
    caption: str = DEFAULT_CAPTION,
    budget_s: float = 3.0,
) -> dict[str, float]:
    """Median encode latency per item at each batch size, plus throughput at batch sizes above 1.

    Keys: ``latency_ms_per_image`` / ``latency_ms_per_caption`` at batch 1 and ``..._b{B}`` at batch B,
    and ``images_per_s_b{B}`` / ``captions_per_s_b{B}`` for B > 1. Inputs are prepared beforehand (random
    pixels of ``model.image_size``, pre-tokenised caption), so only the encoders are timed. ``budget_s``
    caps the total time: it is split evenly over the (modality, batch size) measurements, each stopping early
    when its share is used, so large models on slow CPUs still finish in seconds (with fewer repeats).
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"batch_sizes must be positive, got {tuple(batch_sizes)}")
    device, _ = model_device_dtype(model)
    sync = device.type == "cuda"
    share = budget_s / (2 * len(batch_sizes))
    out: dict[str, float] = {}
    with eval_mode(model), torch.inference_mode():
        for b in batch_sizes:
            pixels = _random_pixels(model, b)
            ids, mask = _tokens(model, caption, b)
            suffix = "" if b == 1 else f"_b{b}"
            calls: dict[str, Callable[[], object]] = {
                "image": lambda p=pixels: model.encode_image(p),
                "caption": lambda i=ids, m=mask: model.encode_text(i, m),
            }
            for kind, fn in calls.items():
                seconds = _time_call(fn, repeats, warmup, share, sync)[0]
                out[f"latency_ms_per_{kind}{suffix}"] = 1000.0 * seconds / b
                if b > 1:
                    out[f"{kind}s_per_s{suffix}"] = b / max(seconds, 1e-12)
    return out


def _image_flops(model: nn.Module, batch_size: int = 1) -> float:
    """FLOPs of encoding ``batch_size`` random images (FlopCounterMode's count, as `flops` gives per image)."""
    pixels = _random_pixels(model, batch_size)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(pixels)
    return float(counter.get_total_flops())


def paired_speedup(reference: nn.Module, model: nn.Module, rounds: int = 7, batch_size: int = 1,
                   budget_s: float = 3.0, threads: int | None = 1) -> dict[str, object]:
    """How many times faster ``model`` encodes an image than ``reference``: the median over ``rounds`` of the
    ratio of their median times per call, the two timed back to back in each round, in alternating order.

    Why paired rounds: on a shared machine the load drifts between two measurements taken seconds apart; timing
    both models within each round and taking the median ratio cancels what a single pair of timings picks up.
    Why ``threads`` (default 1, restored afterwards): at batch 1 the ops are too small to share, and a second
    thread waiting for a busy core makes CPU timings erratic (bench/demo_latency.py). Why CPU time on CPU: with
    one thread every op runs on the calling thread, so its CPU time is the encode's own work, which other
    processes holding the core cannot stretch (on a loaded 2-core machine wall-clock rounds of one pair ranged
    2.3-14.5x, CPU-time rounds 2.3-3.1x). ``median`` is that ratio (wall-clock on GPUs), ``median_wall`` the
    wall-clock one; ``flops_ratio`` stands beside, counted, not timed.
    """
    if rounds < 1:
        raise UsageError(f"rounds must be >= 1, got {rounds}")
    share = budget_s / (2 * rounds)
    inputs = [(m, _random_pixels(m, batch_size)) for m in (reference, model)]
    fns = [lambda m=m, p=p: m.encode_image(p) for m, p in inputs]
    device = model_device_dtype(model)[0].type
    cpu = device == "cpu"
    ratios, cpu_ratios = [], []
    before = torch.get_num_threads()
    if threads and cpu:
        torch.set_num_threads(threads)
    try:
        with eval_mode(reference), eval_mode(model), torch.inference_mode():
            for r in range(rounds):
                wall, work = [0.0, 0.0], [0.0, 0.0]
                for i in ((0, 1) if r % 2 == 0 else (1, 0)):  # neither model always runs second
                    wall[i], work[i] = _time_call(fns[i], 10, 2, share, sync=device == "cuda")
                ratios.append(wall[0] / max(wall[1], 1e-12))
                cpu_ratios.append(work[0] / max(work[1], 1e-12))
    finally:
        torch.set_num_threads(before)
    headline = cpu_ratios if cpu else ratios
    out: dict[str, object] = {"median": statistics.median(headline), "rounds": [round(r, 3) for r in headline],
                              "clock": "thread CPU time" if cpu else "wall", "batch_size": batch_size,
                              "threads": threads if cpu and threads else before}
    if cpu:
        out["median_wall"] = statistics.median(ratios)
        out["rounds_wall"] = [round(r, 3) for r in ratios]
    out["flops_ratio"] = _image_flops(reference, batch_size) / max(_image_flops(model, batch_size), 1.0)
    return out


def _rss_bytes() -> int | None:
    """Current resident set size from /proc/self/statm (field 2, in pages); None where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mb(fn: Callable[[], object], interval_s: float = 0.001) -> float:
    """Peak increase in resident memory (MiB) while ``fn`` runs, relative to just before it started.

    Why sampling: getrusage's ru_maxrss and /proc's VmHWM are process-lifetime high-water marks, so they
    cannot see a peak below an earlier one (e.g. after loading a bigger teacher). Instead a background thread
    reads /proc/self/statm every ``interval_s``; spikes shorter than the interval can be missed, so treat the
    result as a slight under-estimate. Without /proc (non-Linux) it falls back to the ru_maxrss increase,
    which is 0 unless fn pushes the process past its previous high-water mark.
    """
    before = _rss_bytes()
    if before is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux/BSD
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, end - start) * scale / 2**20

    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            rss = _rss_bytes() or 0
            peak = max(peak, rss)
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, name="mmkd-peak-rss", daemon=True)
    thread.start()
    try:
        fn()
        peak = max(peak, _rss_bytes() or 0)
    finally:
        stop.set()
        thread.join()
    return max(0, peak - before) / 2**20


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS, so the next RSS baseline is not inflated by earlier work.

    Without it, glibc keeps memory freed after an earlier forward pass, the next pass reuses it, and the RSS
    increase (what peak_memory_mb sees) reads near zero.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def encode_peak_memory_mb(model: nn.Module, batch_size: int = 64, caption: str = DEFAULT_CAPTION,
                          repeats: int = 3) -> dict[str, float]:
    """Peak extra memory (MiB) of encoding a batch of images and of captions, weights excluded.

    On CUDA: the allocator's peak above what was allocated before the call. On CPU: the resident-memory
    increase seen by `peak_memory_mb` (sampled, so a slight under-estimate), after freed memory has been
    returned to the OS; the encode runs ``repeats`` times so the sampler sees the peak more than once.
    """
    device, _ = model_device_dtype(model)
    pixels = _random_pixels(model, batch_size)
    ids, mask = _tokens(model, caption, batch_size)
    calls: dict[str, Callable[[], object]] = {
        f"image_b{batch_size}": lambda: model.encode_image(pixels),
        f"caption_b{batch_size}": lambda: model.encode_text(ids, mask),
    }
    out: dict[str, float] = {}
    with eval_mode(model), torch.inference_mode():
        for key, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                torch.cuda.synchronize()
                out[key] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                _release_free_memory()
                out[key] = peak_memory_mb(lambda f=fn: [f() for _ in range(max(1, repeats))])
    return out


def efficiency_metrics(model: nn.Module, batch_sizes: Sequence[int] = (1, 64), budget_s: float = 3.0,
                       memory_batch: int = 64, threads: int | None = None) -> dict[str, object]:
    """Everything about cost in one block: parameters per tower, GFLOPs, latency/throughput, peak memory.

    Keys are those of the metrics.json model block: ``params``, ``params_per_tower``, ``flops``
    (``image_gflops``, ``text_gflops`` per item), ``latency_ms_per_image`` (batch 1), ``latency`` (all of
    `latency`'s keys plus ``threads``, the intra-op CPU threads used, and the machine's 1-minute load average
    ``cpu_load_1min`` with ``cpu_count``) and ``peak_memory_mb`` (``image_b64``,
    ``caption_b64``). Memory is measured first, before the timing loops leave freed buffers behind.
    ``threads`` sets torch's CPU threads for the measurement (restored afterwards): on a shared machine
    whose cores are busy, 1 thread gives steadier numbers than several threads waiting for each other.
    """
    counts = count_parameters(model)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        memory = encode_peak_memory_mb(model, batch_size=memory_batch)
        lat: dict[str, float] = latency(model, batch_sizes=sorted({1, *batch_sizes}), budget_s=budget_s)
        lat["threads"] = torch.get_num_threads()
        if hasattr(os, "getloadavg"):  # busy cores make timings unreliable: keep the evidence with them
            lat["cpu_load_1min"] = round(os.getloadavg()[0], 2)
            lat["cpu_count"] = os.cpu_count() or 0
    finally:
        torch.set_num_threads(before)
    return {"params": counts["total"], "params_per_tower": counts, "flops": flops(model),
            "latency_ms_per_image": lat["latency_ms_per_image"], "latency": lat,
            "peak_memory_mb": {k: round(v, 3) for k, v in memory.items()}}
