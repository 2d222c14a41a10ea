"""Caption formats (JSONL, CSV/TSV, COCO captions): image-text pairs listed in one file, images resolved
against a root folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mmkd.data.records import DataError, Record, clean_caption
from mmkd.data.sources.checks import existing_dir, existing_file, resolve_image
from mmkd.data.sources.registry import register_format
from mmkd.fileio import read_jsonl

# --------------------------------------------------------------------------------------------------- JSONL


@register_format("jsonl")
def _read_jsonl(path: str, image_root: str | None = None, check_files: bool = True) -> list[Record]:
    """One JSON object per line: ``image`` + ``captions`` (list) or ``caption`` (str), optional key/label."""
    file = existing_file(path, "JSONL file")
    root = Path(image_root).expanduser() if image_root else file.parent
    records = []
    for lineno, obj in read_jsonl(file, "a JSONL data file", DataError):
        origin = f"{file}:{lineno}"
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
        captions = tuple(clean_caption(c, f"{origin} field 'captions'") for c in raw)
        key = next((obj[k] for k in ("key", "id", "image_id") if obj.get(k) is not None), image)
        label = obj.get("label")
        if label is not None and not isinstance(label, int):
            raise DataError(f"{origin}: 'label' must be an integer class index, got {label!r}")
        records.append(Record(key=str(key), image=resolve_image(image, root, origin, check_files),
                              captions=captions, label=label, origin=origin))
    return records


# ------------------------------------------------------------------------------------------------- CSV/TSV


def _read_table(path: str, sep: str, image_key: str, caption_key: str | None, label_key: str | None,
                image_root: str | None, check_files: bool) -> list[Record]:
    file = existing_file(path, "CSV/TSV file")
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
                                     "path": resolve_image(image, root, origin, check_files)}
            if caption_key is not None:
                g["captions"].append(clean_caption(row.get(caption_key) or "",
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


@register_format("csv")
def _read_csv(path: str, image_key: str = "filepath", caption_key: str | None = "title",
              label_key: str | None = None, sep: str = ",", image_root: str | None = None,
              check_files: bool = True) -> list[Record]:
    """Image/caption table with a header row; defaults follow open_clip's CSV loader."""
    return _read_table(path, sep, image_key, caption_key, label_key, image_root, check_files)


@register_format("tsv")
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


@register_format("coco")
def _read_coco(path: str, image_root: str | None = None, check_files: bool = True) -> list[Record]:
    """Official COCO captions format: ``images`` (id, file_name) + ``annotations`` (image_id, caption)."""
    file = existing_file(path, "COCO annotation file")
    if image_root:
        root = existing_dir(image_root, "COCO image_root")
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
        entry[1].append(clean_caption(ann["caption"], f"{origin} (id {ann.get('id')}) field 'caption'"))
    records = []
    for image_id, (file_name, captions) in by_id.items():
        origin = f"{file} image id {image_id}"
        records.append(Record(key=str(image_id), image=resolve_image(file_name, root, origin, check_files),
                              captions=tuple(captions), origin=origin))
    return records
