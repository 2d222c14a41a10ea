"""WebDataset samples: which members are the image, the captions and the label, checked per sample with errors
naming shard and key. Below both readers of shards: the streaming one (`mmkd.data.sharded`) and the ``wds:``
format (`mmkd.data.sources.webdataset`)."""

from __future__ import annotations

import io
import json

from mmkd.data.records import DataError, Record, clean_caption
from mmkd.data.shards import URL_RE, _copy_remote, shard_paths, shard_refs

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
        return tuple(clean_caption(c, f"{origin}.{ext}") for c in raw)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{origin}.{ext}: empty caption; remove the sample or fill the caption")
    return tuple(lines)


def wds_class_names(path: str) -> list[str] | None:
    """``classes.txt`` beside the first shard (one name per line), if present: a local file, or for shards behind
    a URL the URL's ``classes.txt`` (fetched alone, before any shard is)."""
    first = shard_refs(path)[0].name
    if URL_RE.match(first):
        buf = io.BytesIO()
        try:
            _copy_remote(first.split("?")[0].rsplit("/", 1)[0] + "/classes.txt", buf)
        except DataError:
            return None
        return _names(buf.getvalue().decode("utf-8", errors="replace"))
    local = shard_paths(path)
    file = local[0].parent / "classes.txt" if local else None
    if file is None or not file.is_file():
        return None
    return _names(file.read_text(encoding="utf-8"))


def _names(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def wds_record(tar: str, key: str, parts: dict[str, bytes], cap_ext: str | None = None, img_ext: str | None = None,
               lab_ext: str | None = None, captioned: str | None = None, labelled: str | None = None) -> Record:
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
    return Record(key=key, image=image, captions=captions, label=label, origin=origin, shard=str(tar))


