"""``mmkd cache``: run the teacher once over the data and store its embeddings, or ``--verify DIR``; ``mmkd cache
import``/``export``: embeddings computed elsewhere, in clip-retrieval's layout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mmkd.commands.common import DATA_SPECS, positive_int
from mmkd.errors import UsageError


def add_parser(sub: Any) -> None:
    c = sub.add_parser("cache", help="run the teacher once over the data and store its embeddings (or --verify)",
                       epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--teacher", help="model folder or hub id of the teacher")
    c.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="data spec FORMAT:PATH (repeat for several sets, e.g. captioned + uncaptioned images)")
    c.add_argument("--config", help="take the data (train and unpaired specs, limits, world sizes) from a distill "
                                    "or sweep config; --out defaults to its teacher: cache:DIR")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config: a key of its run config, as `mmkd distill CONFIG key=value` sets it (repeat "
                        "for several), e.g. --set data.world_size_unpaired=5000")
    c.add_argument("--out", help="cache folder (resumed if it holds a partial cache of the same build)")
    c.add_argument("--views", type=int, default=1, help="views per image: view 0 = eval transform, 1..K-1 "
                                                        "augmented (default 1)")
    c.add_argument("--randaugment", metavar="N,M[,BINS]", default=None,
                   help="RandAugment on views ≥ 1: N ops per view at magnitude bin M of BINS (default 31), e.g. 2,9 "
                        "(default: off, or the --config's data.randaugment); part of the cache's fingerprint")
    c.add_argument("--crop-scale", metavar="LO,HI", default=None,
                   help="area range of the augmented views' crops, 0 < LO ≤ HI ≤ 1 (default: 0.6,1, or the "
                        "--config's data.crop_scale); part of the cache's fingerprint")
    c.add_argument("--hflip", action="store_true",
                   help="flip half the augmented views left-right (default off: captions may say left or right); "
                        "part of the cache's fingerprint, replayed by training")
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32", "int8"], default="float16",
                   help="storage type (default float16; int8: per-vector symmetric quantisation, about half "
                        "float16's bytes, dequantised on lookup)")
    c.add_argument("--features", action="store_true",
                   help="also store pooled pre-projection features (for objectives with level: features)")
    c.add_argument("--seed", type=int, default=0, help="view seed: view v of sample k is f(seed, k, v)")
    c.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="teacher compute precision (auto: bfloat16 where the hardware supports it)")
    c.add_argument("--batch-size", type=int, default=64, help="teacher batch size (default 64)")
    c.add_argument("--chunk-rows", type=int, default=1024,
                   help="samples per shard; an interrupted build loses at most one chunk (default 1024)")
    c.add_argument("--limit", type=positive_int, default=None, help="keep the first N samples of each --data spec")
    c.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a bad sample (e.g. a shard member missing): stop naming it (default) or skip and count it")
    c.add_argument("--world-n", type=int, default=4000, help="images in a built-in world split (world:SPLIT)")
    c.add_argument("--data-cache", default="runs/.cache", help="cache folder for the built-in world")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--device", default="auto", help="where the teacher runs: auto (cuda:LOCAL_RANK where CUDA "
                                                     "exists, else cpu; the default), cpu, cuda, cuda:N")
    g = c.add_argument_group("synthetic captions (MobileCLIP's dataset reinforcement; see README)")
    g.add_argument("--captioner", metavar="MODEL", help="image-to-text model folder or hub id: store N sampled "
                                                         "captions per image and the teacher's embeddings of them; "
                                                         "or cache:DIR: reuse the captions that cache's build wrote "
                                                         "(same data, --seed, --chunk-rows, N), embedding them only")
    g.add_argument("--synthetic-captions", type=positive_int, metavar="N", help="captions per image (MobileCLIP: 5)")
    g.add_argument("--caption-top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9, MobileCLIP's)")
    g.add_argument("--caption-temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--caption-max-tokens", type=positive_int, default=30,
                   help="longest caption in new tokens (default 30, open_clip CoCa's)")
    c.add_argument("--verify", metavar="DIR", help="check an existing cache completely and exit (1 if damaged)")
    c.add_argument("--quick", action="store_true", help="with --verify: skip checksums and value checks")
    c.set_defaults(func=run, action=None)
    actions = c.add_subparsers(dest="action", metavar="{import,export}",
                               help="embeddings computed elsewhere, in clip-retrieval's layout (img_emb/, text_emb/, "
                                    "metadata/): import them as a cache, or export a cache to it")
    i = actions.add_parser("import", help="import clip-retrieval embeddings as a one-view teacher cache (no teacher "
                                          "weights needed)", epilog=DATA_SPECS,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="folder with img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, metadata/metadata_N.parquet")
    i.add_argument("--data", action="append", default=[], metavar="SPEC", required=True,
                   help="the training data the embeddings are of (repeat for several sets)")
    i.add_argument("--out", required=True, help="the new cache folder (train from it with teacher: cache:DIR)")
    i.add_argument("--match", choices=["auto", "key", "path"], default="auto",
                   help="how metadata rows name samples: key (the key column, else image_path, against sample keys), "
                        "path (image_path against image files), auto (whichever matches more rows; the default)")
    i.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32", "int8"], default="auto",
                   help="storage type (auto: float16 input stays float16, bit-exact; else float32; int8: "
                        "quantised per vector)")
    i.add_argument("--logit-scale", type=float, default=100.0,
                   help="the source model's temperature scale, for logit objectives like kl (default 100, CLIP's)")
    i.add_argument("--chunk-rows", type=int, default=1024, help="samples per stored chunk (default 1024)")
    i.add_argument("--world-n", type=int, default=4000, help="images in a built-in world split (world:SPLIT)")
    i.add_argument("--data-cache", default="runs/.cache", help="cache folder for the built-in world")
    e = actions.add_parser("export", help="export a teacher cache to clip-retrieval's layout (for FAISS/autofaiss)",
                           epilog=DATA_SPECS, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("cache", metavar="CACHE", help="the teacher cache folder")
    e.add_argument("--out", required=True, help="the new folder (refused if it exists and is not empty)")
    e.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="the data the cache was built from: exports each image's caption and image path too")
    e.add_argument("--world-n", type=int, default=4000, help="images in a built-in world split (world:SPLIT)")
    e.add_argument("--data-cache", default="runs/.cache", help="cache folder for the built-in world")


def run(args: argparse.Namespace) -> int:
    if args.action in ("import", "export"):
        from mmkd.cache_command import run_export, run_import

        (run_import if args.action == "import" else run_export)(args)
        return 0
    if args.verify:
        return verify(args)
    from mmkd.cache_command import run_cache

    run_cache(args)
    return 0


def verify(args: argparse.Namespace) -> int:
    """``--verify DIR``: notes on stdout, problems on stderr, then OK/DAMAGED; exit status 1 when damaged."""
    if args.teacher or args.data or args.config:
        raise UsageError("--verify DIR checks an existing cache; it takes no --teacher/--data/--config")
    from mmkd.teacher.cache import verify_cache

    report = verify_cache(args.verify, deep=not args.quick)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{'OK' if report.ok else 'DAMAGED'}: {report.root}" + (f": {report.summary}" if report.summary else ""))
    return 0 if report.ok else 1
