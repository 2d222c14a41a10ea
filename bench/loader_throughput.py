"""Decoders and loader throughput on real photos: which JPEG decoder mmkd uses, and how fast its loader feeds 224-px
training views compared with a bare PIL loop.

Part 1, decoders (one process, one thread, every coco-mini photo): for a 224-px training view (random resized crop,
mmkd's view 1), the 224-px eval view (centre crop) and the same two at 32 px, images/s of decode + crop-resize by:
``pil`` (plain: full decode, then the bicubic resize: the reference), ``pil-draft`` (PIL's ``draft``: DCT scaling
by 1/2, 1/4, 1/8), ``simplejpeg`` (DCT scaling by every n/8), ``simplejpeg-noscale`` (full-size decode: the
library's own speed), ``turbojpeg`` (PyTurboJPEG, every n/8, when it and libturbojpeg are installed: on Debian 12,
``apt-get install libturbojpeg0`` and ``pip install 'PyTurboJPEG<2'``, as PyTurboJPEG 2 needs libjpeg-turbo ≥ 3).
Each scaled decode uses the smallest factor keeping the crop ≥ the output size (``mmkd.data.decode``). Quality:
every view is compared with ``pil``'s (mean absolute difference in levels of 255, worst PSNR); a decoder is adopted
only within ``mmkd.data.decode``'s tolerance. ``decoder_over_pil``: mmkd's decoder (the fastest adopted) over
``pil`` at the 224-px training view (target ≥ 1.5 per core).

Part 2, loader: the photos repeated ``--repeat`` times into WebDataset shards in a temporary folder; images/s of a
bare single-process loop (PIL decode, crop-resize, normalise to a tensor) vs mmkd's own streaming loader (what
``mmkd distill`` runs on ``wds:`` shards: ``mmkd.data.loader`` over the shards' index, see ``mmkd_loader``) at 0, 1
and 2 workers with mmkd's decoder, 224-px training views in batches of ``--batch``, one epoch each. Steady
state: counted from the first batch (time to first batch, which includes reading the shards or starting the
workers, reported apart; the index build, once, too). ``loader_w2_over_bare``: target ≥ 1.7 on 2 cores. Rounds
alternate the configurations; each figure is the best round (the machine may be shared: load averages are
recorded).

Usage: python bench/loader_throughput.py [--data ../shared/data/coco-mini] [--repeat 4] [--shards 4] [--batch 64]
                                         [--rounds 3] [--work DIR] [--note TEXT] [--json PATH]
Prints each figure, then the ratios as the last lines.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmkd.data.batches import ImageBank, TrainData
from mmkd.data.decode import (
    TOLERANCE_MEAN_ABS,
    TOLERANCE_PSNR_DB,
    JpegDecoder,
    decode_rgb,
    jpeg_decoder,
    view_difference,
)
from mmkd.data.records import Record
from mmkd.data.resolve import records_from_spec
from mmkd.data.sources import read_records
from mmkd.data.transforms import (
    center_box,
    crop_resize,
    random_resized_crop_box,
    to_normalized_tensor,
    view_rng,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"
SEED = 0
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
SCALE, RATIO = (0.6, 1.0), (3 / 4, 4 / 3)  # TransformConfig's defaults
ONLINE_VIEWS = 1 << 30  # mmkd.run_setup's views with an online teacher: every drawn view a fresh training crop
VIEWS = {"train224": (224, True), "eval224": (224, False), "train32": (32, True), "eval32": (32, False)}


# --------------------------------------------------------------------------------------------- part 1: decoders


def turbojpeg_decoder() -> tuple[JpegDecoder | None, str]:
    """PyTurboJPEG as a ``JpegDecoder`` (every n/8 factor), or None and why it is unavailable."""
    try:
        import turbojpeg

        tj = turbojpeg.TurboJPEG()
    except (ImportError, OSError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"

    def decode(data: bytes, opened: Image.Image, factor: float) -> Image.Image:
        f = Fraction(round(factor * 8), 8)
        sf = None if f == 1 else (f.numerator, f.denominator)
        return Image.fromarray(tj.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=sf))

    return JpegDecoder("turbojpeg", tuple(n / 8 for n in range(1, 9)), decode), ""


def view_box(w: int, h: int, key: str, size: int, train: bool) -> tuple[float, float, float, float]:
    return random_resized_crop_box(w, h, SCALE, RATIO, view_rng(SEED, key, 1)) if train else center_box(w, h)


def pil_plain(data: bytes, key: str, size: int, train: bool) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(crop_resize(img, view_box(*img.size, key, size, train), size))


def scaled(dec: JpegDecoder | None, scale: bool = True) -> Callable[[bytes, str, int, bool], np.ndarray]:
    def run(data: bytes, key: str, size: int, train: bool) -> np.ndarray:
        w, h = Image.open(io.BytesIO(data)).size  # the header, as mmkd reads it before decoding
        img, box = decode_rgb(data, view_box(w, h, key, size, train), size if scale else 0, dec)
        return np.asarray(crop_resize(img, box, size))

    return run


def compare_decoders(photos: list[tuple[str, bytes]], rounds: int) -> dict[str, Any]:
    tj, tj_why = turbojpeg_decoder()
    cands: dict[str, Callable[[bytes, str, int, bool], np.ndarray]] = {
        "pil": pil_plain, "pil-draft": scaled(jpeg_decoder("pil")), "simplejpeg": scaled(jpeg_decoder("simplejpeg")),
        "simplejpeg-noscale": scaled(jpeg_decoder("simplejpeg"), scale=False)}
    if tj is not None:
        cands["turbojpeg"] = scaled(tj)
    out: dict[str, Any] = {"photos": len(photos), "rounds": rounds, "turbojpeg_unavailable": tj_why or None,
                           "tolerance": {"worst_psnr_db": TOLERANCE_PSNR_DB, "mean_abs": TOLERANCE_MEAN_ABS},
                           "views": {}}
    torch.set_num_threads(1)
    for view, (size, train) in VIEWS.items():
        ref = [pil_plain(d, k, size, train) for k, d in photos]
        best = {name: math.inf for name in cands}
        outs: dict[str, list[np.ndarray]] = {}
        for _ in range(rounds):
            for name, fn in cands.items():
                t0 = time.perf_counter()
                outs[name] = [fn(d, k, size, train) for k, d in photos]
                best[name] = min(best[name], time.perf_counter() - t0)
        rows = {}
        for name in cands:
            diffs = [view_difference(a, b) for a, b in zip(outs[name], ref)]
            mean_abs, worst = float(np.mean([m for m, _ in diffs])), min(p for _, p in diffs)
            rows[name] = {"images_per_s": len(photos) / best[name], "mean_abs": mean_abs, "worst_psnr_db": worst,
                          "within_tolerance": worst >= TOLERANCE_PSNR_DB and mean_abs <= TOLERANCE_MEAN_ABS}
            r = rows[name]
            print(f"{view:9s} {name:19s} {r['images_per_s']:7.1f} images/s  mean |Δ| {mean_abs:.2f}  worst "
                  f"{worst:.1f} dB  {'ok' if r['within_tolerance'] else 'OUT of tolerance'}", flush=True)
        out["views"][view] = rows
    return out


# ----------------------------------------------------------------------------------------------- part 2: loader


def write_shards(photos: list[tuple[str, bytes]], repeat: int, shards: int, folder: Path) -> str:
    """The photos ``repeat`` times over, round-robin into ``shards`` tar files; returns mmkd's source spec."""
    folder.mkdir(parents=True, exist_ok=True)
    tars = [tarfile.open(folder / f"photos-{i:04d}.tar", "w") for i in range(shards)]
    n = 0
    for r in range(repeat):
        for key, data in photos:
            tf = tars[n % shards]
            for ext, payload in (("jpg", data), ("txt", f"photo {key}".encode())):
                info = tarfile.TarInfo(f"r{r}-{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            n += 1
    for tf in tars:
        tf.close()
    return f"wds:{folder}"


def mmkd_loader(shards: Sequence[Record], workers: int, batch: int, size: int = 224) -> Iterator[torch.Tensor]:
    """What ``mmkd distill`` runs on ``wds:`` shards with augmentation and an online teacher: the streaming data
    plane (`TrainData` over the shards' index, shard-window shuffle, ``views`` = any: every view a fresh 224-px
    training crop), batches decoded by ``workers`` DataLoader workers (uint8 to this process, normalised here),
    one epoch. The decoder is mmkd's default (the fastest installed, `mmkd.data.decode.jpeg_decoder`)."""
    bank = ImageBank(shards, size, MEAN, STD, augment=True, seed=SEED)
    data = TrainData(bank, None, batch, 0, world=1, seed=SEED, views=ONLINE_VIEWS)
    for b in data.batches(0, data.plan.per_epoch, workers=workers):
        yield b.pixel_values


def bare_loop(shards: str, batch: int, size: int = 224) -> Iterator[torch.Tensor]:
    """The simplest loop a user writes: PIL decode, the same crop-resize, normalise, stack: one process."""
    out = []
    for rec in read_records(shards):
        assert isinstance(rec.image, bytes)
        img = Image.open(io.BytesIO(rec.image)).convert("RGB")
        img = crop_resize(img, view_box(*img.size, rec.key, size, True), size)
        out.append(to_normalized_tensor(img, MEAN, STD))
        if len(out) == batch:
            yield torch.stack(out)
            out = []
    if out:
        yield torch.stack(out)


def time_batches(batches: Iterator[torch.Tensor]) -> dict[str, float]:
    t0 = time.perf_counter()
    first = next(batches)
    t1 = time.perf_counter()
    n = 0
    for b in batches:
        n += len(b)
    t2 = time.perf_counter()
    return {"first_batch_s": t1 - t0, "images": n + len(first), "images_per_s": n / (t2 - t1) if n else 0.0}


def compare_loaders(shards: str, batch: int, rounds: int, decoder: str, cache: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    sharded = records_from_spec(shards, cache, stream=True)  # the O(shards) index, as `mmkd distill` opens it
    index_s = time.perf_counter() - t0
    configs: dict[str, Callable[[], Iterator[torch.Tensor]]] = {"bare": lambda: bare_loop(shards, batch)}
    for w in (0, 1, 2):
        configs[f"mmkd_w{w}"] = lambda w=w: mmkd_loader(sharded, w, batch)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
    torch.set_num_threads(1)
    for r in range(rounds):
        for name, make in configs.items():
            runs[name].append(time_batches(make()))
            x = runs[name][-1]
            print(f"round {r} {name:8s} {x['images_per_s']:7.1f} images/s (first batch {x['first_batch_s']:.2f} s)",
                  flush=True)
    best = {k: max(v, key=lambda x: x["images_per_s"]) for k, v in runs.items()}
    return {"samples": runs["bare"][0]["images"], "batch": batch, "decoder": decoder, "index_build_s": index_s,
            "best": best, "rounds": runs}


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="coco-mini (its images/*.jpg)")
    ap.add_argument("--repeat", type=int, default=4, help="copies of the photos in the shards")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="folder for the shards (default: a temporary one)")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile, for the JSON")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    paths = sorted((args.data / "images").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no photos in {args.data / 'images'}; pass --data (coco-mini sits at ../shared/data)")
    photos = [(p.stem, p.read_bytes()) for p in paths]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    decoders = compare_decoders(photos, args.rounds)
    train = decoders["views"]["train224"]
    adopted = {k: v for k, v in train.items() if v["within_tolerance"] and k != "simplejpeg-noscale"}
    fastest = max(adopted, key=lambda k: adopted[k]["images_per_s"])
    chosen = jpeg_decoder().name
    print(f"fastest within tolerance at train224: {fastest}; mmkd decodes with: {chosen}", flush=True)
    chosen_row = "pil-draft" if chosen == "pil" else chosen
    tmp = tempfile.TemporaryDirectory(prefix="mmkd-loader-") if args.work is None else None
    work = Path(tmp.name) if tmp is not None else args.work
    try:
        spec = write_shards(photos, args.repeat, args.shards, work / "shards")
        loaders = compare_loaders(spec, args.batch, args.rounds, chosen, work / "cache")
    finally:
        if tmp is not None:
            tmp.cleanup()
    best = loaders["best"]
    ratios = {"loader_w2_over_bare": best["mmkd_w2"]["images_per_s"] / best["bare"]["images_per_s"],
              "decoder_over_pil": train[chosen_row]["images_per_s"] / train["pil"]["images_per_s"]}
    result = {**ratios, "targets": {"loader_w2_over_bare": 1.7, "decoder_over_pil": 1.5},
              "details": {"decoders": decoders, "fastest_within_tolerance": fastest, "mmkd_decoder": chosen,
                          "loader": loaders, "seconds": time.perf_counter() - t0,
                          "machine": {"cpu_count": os.cpu_count(), "loadavg_before": load_before,
                                      "loadavg_after": os.getloadavg(), "note": args.note}}}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, x in best.items():
        print(f"{name}: {x['images_per_s']:.1f} images/s")
    print(f"loader_w2_over_bare: {ratios['loader_w2_over_bare']:.2f} (target ≥ 1.7 on 2 cores)")
    print(f"decoder_over_pil: {ratios['decoder_over_pil']:.2f} (target ≥ 1.5 per core; {chosen} vs PIL, "
          "224-px training view)")
    return result


if __name__ == "__main__":
    main()
