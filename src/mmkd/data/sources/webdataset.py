"""WebDataset tar shards read with ``tarfile`` (no webdataset dependency): shard specs with brace patterns and
comma lists, samples grouped by key, and cut or damaged shards reported rather than silently shortened."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from mmkd.data.records import BadSamples, DataError, Record
from mmkd.data.sources.checks import clean_caption
from mmkd.data.sources.registry import register_format

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")




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
        return tuple(clean_caption(c, f"{origin}.{ext}") for c in raw)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{origin}.{ext}: empty caption; remove the sample or fill the caption")
    return tuple(lines)


def wds_class_names(path: str) -> list[str] | None:
    """``classes.txt`` beside the first shard (one name per line), if present."""
    first = shard_paths(path)[0]
    file = first.parent / "classes.txt"
    if not file.is_file():
        return None
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


@register_format("wds", class_names=wds_class_names)
def read_wds(path: str, caption_key: str | None = None, image_key: str | None = None,
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
        if lab_ext and wds_class_names(path) is not None else None
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
    return Record(key=key, image=image, captions=captions, label=label, origin=origin, shard=str(tar))


