"""Readers for every on-disk data format, all yielding `Record`s, so training never branches on format.

Data are named by ``FORMAT:PATH`` specs everywhere (CLI, configs); format options are plain keyword
arguments of `read_records` / `class_names` (no ``?a=b`` syntax, so paths never need quoting):

====================  ==========================================================================
spec                  options (defaults)
====================  ==========================================================================
``jsonl:FILE``        ``image_root=None`` (default: the JSONL's folder), ``check_files=True``
``csv:FILE``          ``image_key="filepath"``, ``caption_key="title"``, ``label_key=None``,
                      ``sep=","``, ``image_root=None``, ``check_files=True``  (open_clip's defaults)
``tsv:FILE``          as csv with ``sep="\\t"``
``coco:FILE``         ``image_root=None`` (default: ``images/`` beside the JSON if it exists, else
                      the JSON's folder), ``check_files=True``
``imagefolder:DIR``   ``check_files`` (accepted for symmetry; files are found by listing)
``wds:SHARDS``        ``caption_key=None`` (auto: ``txt`` then ``json``), ``image_key=None`` (auto:
                      jpg/jpeg/png/webp), ``label_key="cls"``
``cifar10:PATH``      ``split="train"`` ("train"/"test"); PATH = ``cifar-10-batches-py`` (or its
                      parent) or WebDataset shards (a folder of ``train-*.tar``/``test-*.tar``, a tar,
                      a brace pattern)
``cifar100:DIR``      ``split="train"`` ("train"/"test"); ``cifar-100-python`` (or its parent)
``stl10:DIR``         ``split="train"`` ("train"/"test"/"unlabeled"); ``stl10_binary`` (or its parent)
====================  ==========================================================================

SHARDS: a tar, a folder of tars, a brace pattern ``train-{0000..0004}.tar`` / ``{a,b}.tar``, or a
comma-separated list of any of those. Reading is eager (a list, so length, shuffling and resume are
trivial) but images stay lazy: file paths, encoded bytes from tars, or uint8 arrays for pickled/binary
sets. Every problem raises `DataError` naming the file (and line/row/sample) and what to do.
"""

from __future__ import annotations

import csv
import inspect
import json
import pickle
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.data.records import BadSamples, DataError, Record
from mmkd.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class SourceFormat:
    """A registered format: how to read its records and (for classification sets) its class names."""

    name: str
    read: Callable[..., list[Record]]
    class_names: Callable[..., list[str] | None] | None = None


FORMATS: Registry[SourceFormat] = Registry("data format")


def _format(name: str, class_names: Callable[..., list[str] | None] | None = None):
    """Register a reader function under `name` (filled once at import; nothing mutates it later)."""

    def deco(fn: Callable[..., list[Record]]) -> Callable[..., list[Record]]:
        FORMATS.register(name)(SourceFormat(name, fn, class_names))
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- public API


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``FORMAT:PATH``; an unknown or missing format fails listing the valid ones."""
    valid = ", ".join(FORMATS.names())
    fmt, sep, path = spec.partition(":")
    fmt = fmt.strip().lower()
    if not sep or not fmt:
        raise DataError(f"data spec {spec!r} must look like FORMAT:PATH, e.g. jsonl:data/captions.jsonl; "
                        f"valid formats: {valid}")
    if fmt not in FORMATS:
        raise DataError(f"data spec {spec!r}: unknown format {fmt!r}; valid formats: {valid}")
    if not path.strip():
        raise DataError(f"data spec {spec!r} has no path after '{fmt}:'")
    return fmt, path.strip()


def read_records(spec: str, bad: BadSamples | None = None, **options: Any) -> list[Record]:
    """Read all records of a ``FORMAT:PATH`` spec; keys are unique (DataError naming duplicates if not).

    bad: what to do with a bad sample in formats that can tell one (WebDataset shards): raise (default) or skip
    and count it.
    """
    fmt, path = parse_spec(spec)
    src = FORMATS.get(fmt)
    _check_options(src, options)
    if "bad" in inspect.signature(src.read).parameters:
        options = {**options, "bad": bad}
    records = src.read(path, **options)
    _check_unique_keys(records, spec)
    return records


def class_names(spec: str, **options: Any) -> list[str] | None:
    """Class names (index i = label i) for classification sets; None for caption-only formats.

    Accepts the same options as `read_records` so callers can pass one options dict to both.
    """
    fmt, path = parse_spec(spec)
    src = FORMATS.get(fmt)
    _check_options(src, options)
    if src.class_names is None:
        return None
    accepted = inspect.signature(src.class_names).parameters
    return src.class_names(path, **{k: v for k, v in options.items() if k in accepted})


# ------------------------------------------------------------------------------------------------- helpers


def _check_options(src: SourceFormat, options: dict[str, Any]) -> None:
    params = inspect.signature(src.read).parameters
    valid = [p for p in params if p not in ("path", "bad")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"format {src.name!r} has no option(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(valid) or '(none)'}")


def _check_unique_keys(records: list[Record], where: str) -> None:
    seen: dict[str, Record] = {}
    dups: list[str] = []
    for r in records:
        first = seen.setdefault(r.key, r)
        if first is not r:
            dups.append(f"{r.key!r} ({first.origin} and {r.origin})")
    if dups:
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise DataError(f"{where}: duplicate record keys {', '.join(dups[:5])}{more}; "
                        "keys must be unique: remove the repeated entries or give them distinct ids")


def _existing_file(path: str | Path, what: str = "data file") -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        hint = " (it is a folder)" if p.is_dir() else ""
        raise DataError(f"{what} {p} not found{hint}; check the path in your data spec")
    return p


def _existing_dir(path: str | Path, what: str = "data folder") -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        hint = " (it is a file)" if p.is_file() else ""
        raise DataError(f"{what} {p} not found{hint}; check the path in your data spec")
    return p


def _resolve_image(value: str, root: Path, origin: str, check: bool) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = root / p
    if check and not p.is_file():
        raise DataError(f"{origin}: image file {p} does not exist; fix the path (relative paths are "
                        f"resolved against {root}) or remove the entry")
    return p


def _clean_caption(text: Any, origin: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{origin}: caption must be a string, got {type(text).__name__}: {text!r}")
    text = text.strip()
    if not text:
        raise DataError(f"{origin}: empty caption; remove it or fill it with text")
    return text


# --------------------------------------------------------------------------------------------------- JSONL


@_format("jsonl")
def _read_jsonl(path: str, image_root: str | None = None, check_files: bool = True) -> list[Record]:
    """One JSON object per line: ``image`` + ``captions`` (list) or ``caption`` (str), optional key/label."""
    file = _existing_file(path, "JSONL file")
    root = Path(image_root).expanduser() if image_root else file.parent
    records = []
    with file.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin = f"{file}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{origin}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{origin}: expected a JSON object, got {type(obj).__name__}")
            image = obj.get("image")
            if not isinstance(image, str) or not image.strip():
                raise DataError(f"{origin}: missing 'image' field (a path relative to {root} or absolute); "
                                f"fields found: {', '.join(obj) or '(none)'}")
            if "captions" in obj:
                raw = obj["captions"]
                if not isinstance(raw, list):
                    raise DataError(f"{origin}: 'captions' must be a list of strings")
            elif "caption" in obj:
                raw = [obj["caption"]]
            else:
                raw = []
            captions = tuple(_clean_caption(c, f"{origin} field 'captions'") for c in raw)
            key = next((obj[k] for k in ("key", "id", "image_id") if obj.get(k) is not None), image)
            label = obj.get("label")
            if label is not None and not isinstance(label, int):
                raise DataError(f"{origin}: 'label' must be an integer class index, got {label!r}")
            records.append(Record(key=str(key), image=_resolve_image(image, root, origin, check_files),
                                  captions=captions, label=label, origin=origin))
    return records


# ------------------------------------------------------------------------------------------------- CSV/TSV


def _read_table(path: str, sep: str, image_key: str, caption_key: str | None, label_key: str | None,
                image_root: str | None, check_files: bool) -> list[Record]:
    file = _existing_file(path, "CSV/TSV file")
    root = Path(image_root).expanduser() if image_root else file.parent
    # Rows of one image are merged (CSV exports usually repeat the image once per caption).
    groups: dict[str, dict[str, Any]] = {}
    with file.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        needed = [("image_key", image_key), ("caption_key", caption_key), ("label_key", label_key)]
        for opt, col in needed:
            if col is not None and col not in columns:
                raise DataError(f"{file}: no column {col!r} (option {opt}); columns found: "
                                f"{', '.join(columns) or '(none)'}; pass {opt}=... (and sep=... if the "
                                f"separator is not {sep!r})")
        for row in reader:
            origin = f"{file}:{reader.line_num}"
            image = (row.get(image_key) or "").strip()
            if not image:
                raise DataError(f"{origin}: empty {image_key!r} cell; fill in the image path or "
                                "remove the row")
            g = groups.get(image)
            if g is None:
                g = groups[image] = {"origin": origin, "captions": [], "label": None,
                                     "path": _resolve_image(image, root, origin, check_files)}
            if caption_key is not None:
                g["captions"].append(_clean_caption(row.get(caption_key) or "",
                                                    f"{origin} column {caption_key!r}"))
            if label_key is not None:
                try:
                    label = int((row.get(label_key) or "").strip())
                except ValueError:
                    raise DataError(f"{origin}: column {label_key!r} must be an integer class index, "
                                    f"got {row.get(label_key)!r}") from None
                if g["label"] is not None and g["label"] != label:
                    raise DataError(f"{origin}: image {image} has label {label} but {g['origin']} says "
                                    f"{g['label']}; make them agree")
                g["label"] = label
    return [Record(key=image, image=g["path"], captions=tuple(g["captions"]), label=g["label"],
                   origin=g["origin"]) for image, g in groups.items()]


@_format("csv")
def _read_csv(path: str, image_key: str = "filepath", caption_key: str | None = "title",
              label_key: str | None = None, sep: str = ",", image_root: str | None = None,
              check_files: bool = True) -> list[Record]:
    """Image/caption table with a header row; defaults follow open_clip's CSV loader."""
    return _read_table(path, sep, image_key, caption_key, label_key, image_root, check_files)


@_format("tsv")
def _read_tsv(path: str, image_key: str = "filepath", caption_key: str | None = "title",
              label_key: str | None = None, sep: str = "\t", image_root: str | None = None,
              check_files: bool = True) -> list[Record]:
    """Tab-separated variant of csv (the open_clip default file type)."""
    return _read_table(path, sep, image_key, caption_key, label_key, image_root, check_files)


# ---------------------------------------------------------------------------------------------------- COCO


def _load_json(file: Path) -> Any:
    try:
        with file.open(encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


@_format("coco")
def _read_coco(path: str, image_root: str | None = None, check_files: bool = True) -> list[Record]:
    """Official COCO captions format: ``images`` (id, file_name) + ``annotations`` (image_id, caption)."""
    file = _existing_file(path, "COCO annotation file")
    if image_root:
        root = _existing_dir(image_root, "COCO image_root")
    else:
        root = file.parent / "images" if (file.parent / "images").is_dir() else file.parent
    data = _load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        found = ", ".join(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{file}: expected a COCO captions file with 'images' and 'annotations' lists; "
                        f"found {found}")
    by_id: dict[int, tuple[str, list[str]]] = {}
    for i, img in enumerate(data["images"]):
        origin = f"{file} images[{i}]"
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataError(f"{origin}: each image needs 'id' and 'file_name'")
        if img["id"] in by_id:
            raise DataError(f"{origin}: duplicate image id {img['id']}; image ids must be unique")
        by_id[img["id"]] = (img["file_name"], [])
    for i, ann in enumerate(data["annotations"]):
        origin = f"{file} annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError(f"{origin}: each annotation needs 'image_id' and 'caption'")
        entry = by_id.get(ann["image_id"])
        if entry is None:
            raise DataError(f"{origin}: image_id {ann['image_id']} is not in 'images'; add the image or "
                            "remove the annotation")
        entry[1].append(_clean_caption(ann["caption"], f"{origin} (id {ann.get('id')}) field 'caption'"))
    records = []
    for image_id, (file_name, captions) in by_id.items():
        origin = f"{file} image id {image_id}"
        records.append(Record(key=str(image_id), image=_resolve_image(file_name, root, origin, check_files),
                              captions=tuple(captions), origin=origin))
    return records


# --------------------------------------------------------------------------------------------- ImageFolder


def _imagefolder_classes(path: str) -> list[str]:
    root = _existing_dir(path, "ImageFolder folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/<image>.jpg")
    return classes


@_format("imagefolder", class_names=_imagefolder_classes)
def _read_imagefolder(path: str, check_files: bool = True) -> list[Record]:
    """``DIR/<class>/**/*.jpg``: label = index of the class in sorted order; captions are left empty."""
    root = Path(path).expanduser()
    classes = _imagefolder_classes(path)
    records = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        for p in files:
            rel = p.relative_to(root).as_posix()
            records.append(Record(key=rel, image=p, label=label, origin=str(p)))
    if not records:
        raise DataError(f"{root}: class folders {', '.join(classes[:5])} hold no images "
                        f"({'/'.join(IMAGE_EXTENSIONS)})")
    return records


# ---------------------------------------------------------------------------------------------- WebDataset


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces, so ``a.tar,b-{0,1}.tar`` is two patterns."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{0000..0004}`` (zero-padded when written so) and ``{a,b}`` like a shell, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DataError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        padded = (len(lo_s) > 1 and lo_s[0] == "0") or (len(hi_s) > 1 and hi_s[0] == "0")
        width = max(len(lo_s), len(hi_s)) if padded else 0
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    out: list[str] = []
    for item in items:
        out.extend(expand_braces(pattern[:m.start()] + item + pattern[m.end():]))
    return out


def shard_paths(spec_path: str) -> list[Path]:
    """Tar files named by a shard spec (tar, folder of tars, brace pattern, comma list), all existing."""
    paths: list[Path] = []
    for part in _split_top_level(spec_path):
        for name in expand_braces(part):
            p = Path(name).expanduser()
            if p.is_dir():
                tars = sorted(p.glob("*.tar")) + sorted(p.glob("*.tar.gz")) + sorted(p.glob("*.tgz"))
                if not tars:
                    raise DataError(f"{p}: folder holds no .tar shards")
                paths.extend(tars)
            elif p.is_file():
                paths.append(p)
            else:
                raise DataError(f"shard {p} not found (from {spec_path!r}); check the path and brace range")
    if not paths:
        raise DataError(f"shard spec {spec_path!r} names no files")
    return paths


def _tar_samples(tar: Path, bad: BadSamples) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample; members of one sample are contiguous, as in webdataset.

    A shard that ends without tar's end-of-archive marker was cut short: ``tarfile`` reads such a file as a clean,
    shorter archive when the cut falls on a 512-byte block boundary, so the last sample silently loses members.
    Its last sample is reported (``bad``) as possibly incomplete.
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    key: str | None = None
    parts: dict[str, bytes] = {}
    problem = None
    try:
        with tarfile.open(tar, "r:*") as tf:
            last = None
            for m in tf:
                last = m
                if not m.isfile():
                    continue
                dirname, _, base = m.name.rpartition("/")
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                k = f"{dirname}/{stem}" if dirname else stem
                if k != key:
                    if key is not None:
                        samples.append((key, parts))
                    key, parts = k, {}
                f = tf.extractfile(m)
                parts[ext.lower()] = f.read() if f is not None else b""
            if last is not None and not _has_end_marker(tf, last):
                problem = (f"the shard ends without tar's end-of-archive marker after member {last.name!r}: it was "
                           "cut short (a partial download or copy)")
    except (tarfile.TarError, OSError, EOFError) as e:
        if key is None:
            raise DataError(f"{tar}: cannot read tar shard ({e}); re-download or re-create it") from None
        problem = f"the shard is damaged after sample {key!r} ({e})"
    if key is not None:
        samples.append((key, parts))
    if problem is not None:
        cut = samples.pop()[0]  # the sample the cut fell in or after: its members may be incomplete
        bad.report(DataError(f"{tar}:{cut}: {problem}, so this sample may have lost members (extensions read: "
                             f"{', '.join(sorted(parts)) or 'none'}); re-download or re-create the shard"))
    return samples


def _has_end_marker(tf: tarfile.TarFile, last: tarfile.TarInfo) -> bool:
    """Whether a zero block (tar's end-of-archive marker) follows the last member's data."""
    assert tf.fileobj is not None
    tf.fileobj.seek(last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def _wds_captions(data: bytes, ext: str, origin: str) -> tuple[str, ...]:
    text = data.decode("utf-8", errors="replace")
    if ext == "json" or ext.endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{origin}.{ext}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict) and "captions" in obj and isinstance(obj["captions"], list):
            raw = obj["captions"]
        elif isinstance(obj, dict) and "caption" in obj:
            raw = [obj["caption"]]
        else:
            found = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{origin}.{ext}: expected a 'caption' or 'captions' field; found {found}")
        return tuple(_clean_caption(c, f"{origin}.{ext}") for c in raw)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{origin}.{ext}: empty caption; remove the sample or fill the caption")
    return tuple(lines)


def _wds_class_names(path: str) -> list[str] | None:
    """``classes.txt`` beside the first shard (one name per line), if present."""
    first = shard_paths(path)[0]
    file = first.parent / "classes.txt"
    if not file.is_file():
        return None
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


@_format("wds", class_names=_wds_class_names)
def _read_wds(path: str, caption_key: str | None = None, image_key: str | None = None,
              label_key: str | None = "cls", bad: BadSamples | None = None) -> list[Record]:
    """WebDataset tar shards read with `tarfile`; image bytes stay encoded until a worker decodes them.

    An explicitly requested ``caption_key`` missing from a sample fails at that (first) sample, listing
    the extensions present, instead of silently yielding nothing as webdataset pipelines do. A caption that other
    samples have, and in a classification set (``classes.txt`` beside the shards) a label, is needed by every
    sample: one without it is reported by shard and key (``bad``: raise, or skip and count), as is the last sample
    of a shard cut short.
    """
    bad = bad or BadSamples()
    cap_ext = caption_key.lstrip(".").lower() if caption_key else None
    img_ext = image_key.lstrip(".").lower() if image_key else None
    lab_ext = label_key.lstrip(".").lower() if label_key else None
    samples = [(tar, key, parts) for tar in shard_paths(path) for key, parts in _tar_samples(tar, bad)]
    auto_caps = ("txt", "json")
    captioned = next((f"{t}:{k}" for t, k, p in samples if any(e in p for e in auto_caps)), None) \
        if cap_ext is None else None
    # labels are needed by every sample of a classification set (classes.txt beside the shards), else optional
    labelled = next((f"{t}:{k}" for t, k, p in samples if lab_ext in p), None) \
        if lab_ext and _wds_class_names(path) is not None else None
    records: list[Record] = []
    for tar, key, parts in samples:
        try:
            records.append(_wds_record(tar, key, parts, cap_ext, img_ext, lab_ext, captioned, labelled))
        except DataError as e:
            bad.report(e)
    return records


def _wds_record(tar: Path, key: str, parts: dict[str, bytes], cap_ext: str | None, img_ext: str | None,
                lab_ext: str | None, captioned: str | None, labelled: str | None) -> Record:
    """One sample's record, or DataError naming shard and key (captioned/labelled: a sample that has one)."""
    origin = f"{tar}:{key}"
    found = ", ".join(sorted(parts))
    if img_ext:
        if img_ext not in parts:
            raise DataError(f"{origin}: no .{img_ext} image (image_key); extensions found: {found}")
        image = parts[img_ext]
    else:
        image = next((parts[e] for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            raise DataError(f"{origin}: no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)}); "
                            f"extensions found: {found}; pass image_key=EXT")
    if cap_ext:
        if cap_ext not in parts:
            raise DataError(f"{origin}: no .{cap_ext} caption (caption_key={cap_ext!r}); "
                            f"extensions found: {found}; set caption_key to one of those")
        captions = _wds_captions(parts[cap_ext], cap_ext, origin)
    else:
        ext = next((e for e in ("txt", "json") if e in parts), None)
        if ext is None and captioned is not None:
            raise DataError(f"{origin}: no caption (.txt/.json) although other samples have one (e.g. "
                            f"{captioned}); extensions found: {found}; add the caption or remove the sample")
        captions = _wds_captions(parts[ext], ext, origin) if ext else ()
    label = None
    if lab_ext and lab_ext in parts:
        try:
            label = int(parts[lab_ext].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"{origin}.{lab_ext}: label must be an integer in ASCII digits, "
                            f"got {parts[lab_ext][:20]!r}") from None
    elif lab_ext and labelled is not None:
        raise DataError(f"{origin}: no .{lab_ext} label, which every sample of a classification set (classes.txt) "
                        f"needs (e.g. {labelled} has one); extensions found: {found}; add it or remove the sample")
    return Record(key=key, image=image, captions=captions, label=label, origin=origin)


# ------------------------------------------------------------------------------------ CIFAR-10 / CIFAR-100


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR ships as pickles; allow only numpy array reconstruction so a data file cannot run code."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles of bytes written by Python 3
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            if module.startswith("numpy.core"):  # pickles written by numpy 1.x
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def _load_pickle(file: Path) -> dict:
    try:
        with file.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DataError(f"{file}: not a readable CIFAR pickle ({e}); re-download the python version") \
            from None
    if not isinstance(obj, dict):
        raise DataError(f"{file}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(file: Path, label_field: str) -> tuple[np.ndarray, list[int]]:
    """Decode one batch: rows are R(1024) G(1024) B(1024), row-major 32x32 → N x 32 x 32 x 3."""
    d = _load_pickle(file)
    if "data" not in d or label_field not in d:
        raise DataError(f"{file}: missing 'data' or '{label_field}' (found {', '.join(map(str, d))})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = [int(x) for x in d[label_field]]
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DataError(f"{file}: expected data [N, 3072] with N labels, got {data.shape} and {len(labels)}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _find_layout(path: str, subdir: str, marker: str) -> Path | None:
    """The folder holding `marker`: PATH itself or PATH/subdir (users pass either)."""
    root = Path(path).expanduser()
    for cand in (root, root / subdir):
        if (cand / marker).exists():
            return cand
    return None


def _check_exists(path: str, fmt: str, expected: str) -> None:
    """A dataset path that does not exist at all gets its own message (not "wrong layout")."""
    if any(c in path for c in "{,"):  # brace patterns and comma lists are checked shard by shard
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{fmt}:{path}: {p} not found; give the path of {expected}")


def _check_split(split: str, valid: tuple[str, ...], fmt: str) -> None:
    if split not in valid:
        raise DataError(f"{fmt}: unknown split {split!r}; valid: {', '.join(valid)}")


def _cifar10_shards(path: str, split: str) -> str | None:
    """Shard spec for WebDataset CIFAR-10, or None when PATH is the python-pickle layout."""
    _check_exists(path, "cifar10", "the cifar-10-batches-py folder (or its parent) or CIFAR-10 WebDataset shards")
    root = Path(path).expanduser()
    if root.is_dir():
        if _find_layout(path, "cifar-10-batches-py", "batches.meta") or \
                _find_layout(path, "cifar-10-batches-py", "test_batch") or \
                _find_layout(path, "cifar-10-batches-py", "data_batch_1"):
            return None
        tars = sorted(root.glob(f"{split}-*.tar")) or sorted(root.glob(f"{split}*.tar"))
        if tars:
            return ",".join(str(t) for t in tars)
        raise DataError(f"cifar10:{root}: expected cifar-10-batches-py (data_batch_1..5, test_batch) or "
                        f"WebDataset shards {split}-*.tar; found neither")
    return path  # a tar or a brace pattern: used as is, whatever the split


def _cifar10_class_names(path: str, split: str = "train") -> list[str]:
    shards = _cifar10_shards(path, split)
    if shards is not None:
        return _wds_class_names(shards) or list(CIFAR10_CLASSES)
    root = _find_layout(path, "cifar-10-batches-py", "batches.meta")
    if root is None:
        return list(CIFAR10_CLASSES)
    names = _load_pickle(root / "batches.meta").get("label_names", CIFAR10_CLASSES)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


@_format("cifar10", class_names=_cifar10_class_names)
def _read_cifar10(path: str, split: str = "train", bad: BadSamples | None = None) -> list[Record]:
    """CIFAR-10 from the python pickles or from WebDataset shards (``.jpg`` + ``.cls``)."""
    _check_split(split, ("train", "test"), "cifar10")
    shards = _cifar10_shards(path, split)
    if shards is not None:
        records = _read_wds(shards, bad=bad)
        unlabeled = next((r for r in records if r.label is None), None)
        if unlabeled is not None:
            raise DataError(f"{unlabeled.origin}: CIFAR-10 shard sample has no .cls label")
        return records
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    root = _find_layout(path, "cifar-10-batches-py", names[0])
    if root is None:
        raise DataError(f"cifar10:{path}: no {names[0]}; expected the cifar-10-batches-py folder "
                        "(data_batch_1..5, test_batch, batches.meta)")
    records = []
    for name in names:
        file = _existing_file(root / name, "CIFAR-10 batch")
        images, labels = _cifar_arrays(file, "labels")
        records.extend(Record(key=f"{name}_{i:05d}", image=images[i], label=labels[i], origin=f"{file}[{i}]")
                       for i in range(len(labels)))
    return records


def _cifar100_root(path: str) -> Path:
    _check_exists(path, "cifar100", "the cifar-100-python folder (or its parent)")
    root = _find_layout(path, "cifar-100-python", "meta")
    if root is None:
        raise DataError(f"cifar100:{path}: no 'meta' file; expected the cifar-100-python folder "
                        "(train, test, meta)")
    return root


def _cifar100_class_names(path: str) -> list[str]:
    meta = _load_pickle(_cifar100_root(path) / "meta")
    if "fine_label_names" not in meta:
        raise DataError(f"{path}/meta: no 'fine_label_names'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]


@_format("cifar100", class_names=_cifar100_class_names)
def _read_cifar100(path: str, split: str = "train") -> list[Record]:
    """CIFAR-100 python pickles; labels are the 100 fine classes."""
    _check_split(split, ("train", "test"), "cifar100")
    file = _existing_file(_cifar100_root(path) / split, "CIFAR-100 split file")
    images, labels = _cifar_arrays(file, "fine_labels")
    return [Record(key=f"{split}_{i:05d}", image=images[i], label=labels[i], origin=f"{file}[{i}]")
            for i in range(len(labels))]


# ------------------------------------------------------------------------------------------------- STL-10

_STL_PIXELS = 3 * 96 * 96


def _stl10_root(path: str) -> Path:
    _check_exists(path, "stl10", "the stl10_binary folder (or its parent)")
    root = _find_layout(path, "stl10_binary", "class_names.txt") or _find_layout(path, "stl10_binary",
                                                                                 "train_X.bin")
    if root is None:
        raise DataError(f"stl10:{path}: expected the stl10_binary folder (train_X.bin, train_y.bin, "
                        "test_X.bin, test_y.bin, class_names.txt)")
    return root


def _stl10_class_names(path: str) -> list[str]:
    file = _existing_file(_stl10_root(path) / "class_names.txt", "STL-10 class names")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


@_format("stl10", class_names=_stl10_class_names)
def _read_stl10(path: str, split: str = "train") -> list[Record]:
    """STL-10 binaries, memory-mapped; each image is stored channel-major and *column*-major (3x96x96).

    Labels on disk are 1..10 and become 0..9; the unlabeled split has label None.
    """
    _check_split(split, ("train", "test", "unlabeled"), "stl10")
    root = _stl10_root(path)
    xfile = _existing_file(root / f"{split}_X.bin", "STL-10 image file")
    size = xfile.stat().st_size
    if size == 0 or size % _STL_PIXELS:
        raise DataError(f"{xfile}: size {size} is not a multiple of 3*96*96; the file is truncated")
    n = size // _STL_PIXELS
    # [n, channel, column, row] on disk → [n, row, column, channel] views, no copy.
    images = np.memmap(xfile, dtype=np.uint8, mode="r", shape=(n, 3, 96, 96)).transpose(0, 3, 2, 1)
    labels: list[int | None] = [None] * n
    if split != "unlabeled":
        yfile = _existing_file(root / f"{split}_y.bin", "STL-10 label file")
        y = np.fromfile(yfile, dtype=np.uint8)
        if len(y) != n:
            raise DataError(f"{yfile}: {len(y)} labels for {n} images in {xfile.name}")
        if n and (y.min() < 1 or y.max() > 10):
            raise DataError(f"{yfile}: labels must be 1..10, found {y.min()}..{y.max()}")
        labels = [int(v) - 1 for v in y]
    return [Record(key=f"{split}_{i:05d}", image=images[i], label=labels[i], origin=f"{xfile}[{i}]")
            for i in range(n)]
