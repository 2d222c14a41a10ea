"""``mmkd cache``: resolve the teacher and the data the way ``mmkd distill`` does, then build the teacher cache;
``mmkd cache import``/``export``: the same data, for embeddings computed elsewhere."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch

from mmkd.config import ConfigError, RandAugmentConfig, check_crop_scale
from mmkd.data.records import BadSamples, Record, set_max_image_pixels
from mmkd.data.resolve import records_from_spec
from mmkd.data.transforms import with_crop_scale, with_randaugment
from mmkd.devices import resolve_device
from mmkd.dist import init_distributed
from mmkd.errors import UsageError
from mmkd.teacher.cache import BuildResult, BuildSpec, CacheError, build_cache
from mmkd.teacher.cache.size import cache_size
from mmkd.teacher_spec import cache_folder


def parse_randaugment(text: str) -> RandAugmentConfig:
    """``--randaugment N,M[,BINS]`` as a RandAugmentConfig; UsageError naming the flag."""
    parts = text.split(",")
    try:
        numbers = [int(p) for p in parts]
        if not 2 <= len(numbers) <= 3:
            raise ValueError(f"give 2 or 3 numbers, got {len(numbers)}")
        return RandAugmentConfig(*numbers)
    except ValueError as e:
        raise UsageError(f"--randaugment {text!r}: {e} (N,M[,BINS]: N ops per view at magnitude bin M of BINS, "
                         "default 31; e.g. --randaugment 2,9)") from None


def cache_randaugment(flag: RandAugmentConfig | None, cfg: RandAugmentConfig | None) -> RandAugmentConfig | None:
    """RandAugment for the build: ``--randaugment`` or the ``--config``'s data.randaugment (not both)."""
    if flag is not None and cfg is not None:
        raise UsageError("give RandAugment either with --randaugment or through --config's data.randaugment, "
                         "not both")
    return flag if flag is not None else cfg


def parse_crop_scale(text: str) -> list[float]:
    """``--crop-scale LO,HI`` as [lo, hi]; UsageError naming the flag unless 0 < lo ≤ hi ≤ 1."""
    try:
        value = [float(p) for p in text.split(",")]
        check_crop_scale(value)
    except (ValueError, ConfigError):
        raise UsageError(f"--crop-scale {text!r}: give LO,HI with 0 < LO ≤ HI ≤ 1 (the fraction of the image's "
                         "area a crop covers), e.g. --crop-scale 0.35,1") from None
    return value


def cache_crop_scale(flag: list[float] | None, cfg: list[float] | None) -> list[float] | None:
    """The build's crop range: ``--crop-scale`` or the ``--config``'s data.crop_scale (not both)."""
    if flag is not None and cfg is not None:
        raise UsageError("give the crop range either with --crop-scale or through --config's data.crop_scale, "
                         "not both")
    return flag if flag is not None else cfg


def cache_inputs(args: argparse.Namespace) -> tuple[str, tuple[Sequence[Record], ...], str]:
    """(teacher, data sources, out folder) from ``--teacher/--data/--out`` or from a distill ``--config``.

    Sources stay as read (``wds:`` ones lazy, over their shard index): the build walks them shard by shard."""
    teacher, out = args.teacher, args.out
    bad = BadSamples(getattr(args, "on_error", "raise"))
    if args.config:
        if args.data:
            raise CacheError("give the data either with --data or through --config, not both")
        from mmkd.config import config_from_dict
        from mmkd.run_setup import training_records
        from mmkd.sweep_config import load_sweep_config

        # a sweep file is a run config plus its sweep section: the caches its variants read come from its data
        cfg = config_from_dict(load_sweep_config(args.config, list(getattr(args, "overrides", []))).run)
        args.randaugment_config = cfg.data.randaugment
        args.crop_scale_config = cfg.data.crop_scale
        set_max_image_pixels(cfg.data.max_image_pixels)
        bad = BadSamples(cfg.data.on_error)
        paired, unpaired = training_records(cfg, bad)
        sources: list[Sequence[Record]] = [paired, *([unpaired] if unpaired else [])]
        if isinstance(cfg.teacher, list) and not (teacher and out):  # an ensemble: one cache per member
            raise CacheError(f"{args.config} names a teacher ensemble ({', '.join(cfg.teacher)}): build each "
                             "member's cache with its own --teacher MODEL --out DIR")
        target = cache_folder(cfg.teacher)
        out = out or target
        if not teacher and target is None:
            teacher = cfg.teacher
        if not out:
            raise CacheError(f"--out is required: {args.config} has teacher: {cfg.teacher!r}, not cache:DIR")
    else:
        if getattr(args, "overrides", None):
            raise CacheError(f"--set {args.overrides[0]}: --set changes a key of --config's run config; give "
                             "--config CONFIG, or the data with --data SPEC and no --set")
        if not args.data:
            raise CacheError("mmkd cache needs --data SPEC (or --config CONFIG) and --teacher MODEL and --out DIR; "
                             "or --verify DIR")
        sources = []
        for spec in args.data:
            recs = records_from_spec(spec, args.data_cache, world_n=args.world_n, bad=bad, stream=True)
            sources.append(recs[: args.limit] if args.limit else recs)
    if not teacher:
        raise CacheError("--teacher MODEL is required (a model folder or hub id)")
    if not out:
        raise CacheError("--out DIR is required")
    if bad.count:
        print(f"on_error: skip: left out {bad.count} bad sample(s); first: {bad.skipped[0]}")
    return teacher, tuple(sources), out


def _source_name(teacher: str) -> str:
    """A local teacher by its absolute path (the same folder named relatively or absolutely is one teacher), a hub
    id as given. Recorded in meta.json for people; the build's identity is the teacher's weights hash."""
    return os.path.abspath(teacher) if os.path.exists(teacher) else teacher


def run_cache(args: argparse.Namespace, log: Any = print) -> BuildResult:
    from mmkd.models.hub import load_dual_encoder

    device = resolve_device(getattr(args, "device", None) or "auto", "--device")  # a missing GPU fails first
    info = init_distributed(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    flag = getattr(args, "randaugment", None)
    flag = parse_randaugment(flag) if flag is not None else None  # a malformed flag fails before data is read
    crop = getattr(args, "crop_scale", None)
    crop = parse_crop_scale(crop) if crop is not None else None
    teacher_path, records, out = cache_inputs(args)
    ra = cache_randaugment(flag, getattr(args, "randaugment_config", None))
    crop = cache_crop_scale(crop, getattr(args, "crop_scale_config", None))
    captioner, sampling = _captioner(args)  # a bad captioner fails before the teacher is loaded
    augmentation = with_crop_scale(with_randaugment(None, ra), crop)
    if getattr(args, "hflip", False):
        augmentation["hflip"] = True
    spec = BuildSpec(views=args.views, dtype=args.dtype, features=args.features, seed=args.seed,
                     augmentation=augmentation or None, precision=args.precision,
                     chunk_rows=args.chunk_rows, batch_size=args.batch_size, source=_source_name(teacher_path),
                     captioner=captioner.to(device) if captioner is not None else None, sampling=sampling)
    teacher = load_dual_encoder(teacher_path).to(device)
    result = build_cache(teacher, records, out, spec, progress=info.is_main, log=log if info.is_main else None)
    if info.is_main:
        log(f"teacher cache ready: {result.root} ({result.n_samples} samples × {result.views} view(s), "
            f"{result.n_captions} captions; {result.chunks_built} chunk(s) written in {result.segments_built} shard "
            "segment(s)" + (f" by rank 0 of {info.world_size}" if info.world_size > 1 else "")
            + (f", {result.chunks_skipped} already there" if result.chunks_skipped else "")
            + (f"; {result.segments_skipped} shard(s) were cached before" if result.segments_skipped else "")
            + f", {result.seconds:.1f} s). Train from it with `teacher: cache:{result.root}`")
        log(cache_size(result.root).line())
    return result


def _captioner(args: argparse.Namespace) -> tuple[Any, Any]:
    """(captioner, sampling settings) of ``--captioner MODEL --synthetic-captions N``, or (None, None)."""
    name, n = getattr(args, "captioner", None), getattr(args, "synthetic_captions", None)
    if name is None and n is None:
        return None, None
    if name is None or n is None:
        raise CacheError("--captioner MODEL and --synthetic-captions N go together (N captions per image from MODEL)")
    from mmkd.teacher.captioner import Sampling, load_captioner

    folder = cache_folder(name)
    if folder is not None:  # reuse the captions another cache's build wrote (e.g. another teacher's)
        from mmkd.teacher.cache.synthetic import CachedCaptions

        cached = CachedCaptions(folder)
        return cached, cached.sampling(n, args.seed, args.chunk_rows)
    sampling = Sampling(n, top_p=args.caption_top_p, temperature=args.caption_temperature,
                        max_tokens=args.caption_max_tokens, batch_size=args.batch_size)
    return load_captioner(_source_name(name)), sampling


def _records(args: argparse.Namespace) -> list[Record]:
    """Every sample of the ``--data`` specs, in order (held in memory: an import matches rows to all of them)."""
    return [r for spec in args.data
            for r in records_from_spec(spec, args.data_cache, world_n=args.world_n, bad=BadSamples("raise"))]


def run_import(args: argparse.Namespace, log: Any = print) -> Any:
    from mmkd.teacher.cache.imported import import_embeddings

    return import_embeddings(args.source, _records(args), args.out, match=args.match, dtype=args.dtype,
                             logit_scale=args.logit_scale, chunk_rows=args.chunk_rows, log=log)


def run_export(args: argparse.Namespace, log: Any = print) -> Any:
    from mmkd.teacher.cache.export import export_cache

    return export_cache(args.cache, args.out, _records(args) if args.data else None, log=log)
