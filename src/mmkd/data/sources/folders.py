"""ImageFolder (``DIR/<class>/<image>``): a classification set whose labels are its folder names."""

from __future__ import annotations

from pathlib import Path

from mmkd.data.records import DataError, Record
from mmkd.data.sources.checks import existing_dir
from mmkd.data.sources.registry import register_format

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")




# --------------------------------------------------------------------------------------------- ImageFolder


def _imagefolder_classes(path: str) -> list[str]:
    root = existing_dir(path, "ImageFolder folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/<image>.jpg")
    return classes


@register_format("imagefolder", class_names=_imagefolder_classes)
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
