"""Whether a teacher cache is whole, and whether it fits the training that reads it: each refusal names what differs
and what to do. Kept apart from the reader so that lookups read in one place and every consistency rule in
another. Hard differences (a missing key, array, view or width) are never overridable; fingerprint differences
(data, transform, teacher weights) are, with ``train.ignore_cache_fingerprint``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mmkd.data.records import Record
from mmkd.data.transforms import TRANSFORM_VERSION
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache.expect import CacheExpectation
from mmkd.teacher.cache.format import (
    DONE_FILE,
    SEGMENT_FILE,
    SEGMENTS,
    SHARD_STAMP,
    CacheError,
    CacheFingerprintError,
    StringTable,
    read_json_or_none,
    shard_id,
)
from mmkd.teacher.cache.reader import CacheReader

IN_MEMORY = "(in-memory records)"  # how a message names the shard of records held in a list


def check_segments(cache: CacheReader) -> None:
    """Every segment the manifest lists is committed, with every chunk written and every array of its size."""
    for folder, lay, seg in zip(cache.folders, cache.layouts, cache.manifest["segments"]):
        if not (folder / DONE_FILE).is_file() or not (folder / SEGMENT_FILE).is_file():
            shard = seg["shard"] or "in memory"
            raise CacheError(f"teacher cache {cache.root} is damaged: segment {folder} (shard {shard}) is listed in "
                             "manifest.json but not complete; rerun the same `mmkd cache` command to finish it")
        missing = [c for c in lay.chunks() if not lay.marker(c).is_file()]
        if missing:
            raise CacheError(f"teacher cache {cache.root} is incomplete: {len(missing)} of {len(lay.chunks())} chunks "
                             f"of segment {folder.name} are not written (first: {missing[0].name}); rerun the "
                             "same `mmkd cache` command to finish it")
        for c in lay.chunks():
            for name in lay.arrays_of(c.kind):
                lay.check_shard(c, name)


def lacking_shards(records: Sequence[Record], held: set[str]) -> list[str]:
    """The data shards of ``records`` the cache holds no segment of, in data order."""
    return list(dict.fromkeys(r.shard or IN_MEMORY for r in records if shard_id(r.shard) not in held))


def lacking_message(lacking: Sequence[str], n_shards: int) -> str:
    """The one refusal of a cache that lacks some of the training data's shards."""
    return (f"it lacks {len(lacking)} of the training data's {n_shards} shard(s) (it is partly built, or the data "
            f"grew): {', '.join(map(repr, lacking[:3]))}{' …' if len(lacking) > 3 else ''}; cache them with the "
            "same `mmkd cache` command over the whole data (it computes only the missing shards), or train on the "
            "cached shards only with data.only_cached_shards: true")


def restrict(cache: CacheReader, records: Sequence[Record]) -> tuple[list[Record], list[str]]:
    """(the records of shards the cache holds, the shards it lacks in data order): training on a partly built
    cache's shards only (``data.only_cached_shards``)."""
    held = set(cache.shards)
    return [r for r in records if shard_id(r.shard) in held], lacking_shards(records, held)


def check(cache: CacheReader, expect: CacheExpectation) -> None:
    """Refuse, with a message naming what differs, a cache that does not fit ``expect``."""
    hard = _capacity(cache, expect)
    soft: list[str] = []
    text = "text_embeds" in expect.arrays or "text_features" in expect.arrays
    if expect.sharded:
        expect = _check_shards(cache, expect, hard, soft)
    if expect.records is not None:
        hard += _missing(cache, expect, text)
        soft += _changed(cache, expect.records)
    soft += _transform(cache, expect)
    if expect.teacher_sha256 is not None and expect.teacher_sha256 != cache.info.teacher.weights_sha256:
        soft.append("teacher.weights_sha256: the cache was built by a teacher with other weights")
    if hard:
        raise CacheError(f"teacher cache {cache.root} cannot serve this training: " + "; ".join(hard))
    if soft and not expect.ignore_fingerprint:
        raise CacheFingerprintError(
            f"teacher cache {cache.root} was built for other data or transforms: {'; '.join(soft[:6])}"
            f"{f' (and {len(soft) - 6} more)' if len(soft) > 6 else ''}. Rebuild the cache with `mmkd cache`, or "
            "if you are sure the targets still fit, set train.ignore_cache_fingerprint: true "
            "(CLI: --ignore-fingerprint)")


def _capacity(cache: CacheReader, expect: CacheExpectation) -> list[str]:
    """What the cache cannot serve at all: arrays, views and widths."""
    info, hard = cache.info, []
    imported = info.imported
    missing_arrays = [a for a in expect.arrays if a not in cache.arrays]
    if missing_arrays:
        features = any(a.endswith("_features") for a in missing_arrays)
        hard.append(f"it holds no {', '.join(missing_arrays)}" + (
            " (it was imported from embeddings computed elsewhere, which hold no pooled features: use "
            "objectives on embeddings, level: embeds)" if features and imported else
            " (the imported embeddings had no text_emb/)" if imported else
            " (an objective works on pooled features: rebuild the cache with --features)" if features else
            " (the data had no captions when it was built)" if "text_embeds" in missing_arrays else ""))
    if expect.views is not None and expect.views > info.views:
        hard.append(f"training draws views 0..{expect.views - 1} but the cache holds {info.views} view(s): "
                    f"rebuild with --views {expect.views} or set data.views ≤ {info.views}")
    if expect.augment and info.views == 1 and imported:
        hard.append("training augments images but the cache was imported from embeddings computed elsewhere, "
                    "which hold view 0 only (the plain image): set data.augment: false")
    elif expect.augment and info.views == 1:
        hard.append("training augments images but the cache holds only view 0 (no augmented views): rebuild "
                    "with --views K (K ≥ 2) or set data.augment: false")
    dim, fdims = info.teacher.projection_dim, info.teacher.feature_dims
    if expect.embed_dim is not None and expect.embed_dim != dim:
        hard.append(f"its embeddings are {dim}-wide, expected {expect.embed_dim}")
    for tower, width in (expect.feature_dims or {}).items():
        if fdims.get(tower) != width:
            hard.append(f"its {tower} features are {fdims.get(tower)}-wide, expected {width}")
    return hard


def _transform(cache: CacheReader, expect: CacheExpectation) -> list[str]:
    """How the cache's views were made against how training makes them: seed, augmentation, decoder, version."""
    info, soft = cache.info, []
    if expect.view_seed is not None and expect.view_seed != info.view_seed:
        soft.append(f"transform.view_seed: the cache's views were drawn with seed {info.view_seed}, training "
                    f"replays seed {expect.view_seed} (build the student's image banks with CachedTeacher.bank)")
    if expect.augmentation is not None:
        soft += fp.diff(dict(info.augmentation), dict(expect.augmentation), "transform.augmentation",
                        ("cache", "training"))
    built_by = info.decoder  # absent in caches built before it was recorded
    if expect.decoder is not None and built_by is not None and expect.decoder != built_by:
        soft.append(f"transform.decoder: the cache's views were decoded by {built_by}, training decodes JPEGs "
                    f"with {expect.decoder} (slightly different pixels): install {built_by} where training runs "
                    "or rebuild the cache there")
    if info.transform_version != TRANSFORM_VERSION:
        soft.append(f"transform.version: the cache's views come from transform version "
                    f"{info.transform_version}, this mmkd makes version {TRANSFORM_VERSION}")
    return soft


def _stamp_differs(cache: CacheReader, seg: dict, now: dict) -> tuple[str | None, bool]:
    """(what differs between a segment's shard stamp and the shard now, or None; whether the stamp has no
    digest). A segment without a stamp (built from records in a list) differs in an unnamed way (``""``)."""
    then = read_json_or_none(cache.root / SEGMENTS / seg["name"] / SHARD_STAMP)
    if not (isinstance(then, dict) and {"size", "count"} <= set(then)):
        return "", False
    if (then["size"], then["count"]) != (now["size"], now["count"]):
        return (f"{then['size']} bytes, {then['count']} samples then; {now['size']} bytes, {now['count']} samples "
                "now"), False
    if "sha256" not in then:
        return None, True
    if then["sha256"] != now["sha256"]:
        return f"same size, content SHA-256 {str(then['sha256'])[:12]}… then, {now['sha256'][:12]}… now", False
    return None, False


def _check_shards(cache: CacheReader, expect: CacheExpectation, hard: list[str], soft: list[str]
                  ) -> CacheExpectation:
    """Sharded training data against the segments, by the shard index alone: each shard the cache lacks is
    named, each whose size, sample count or content digest (SHA-256 of its bytes: the size alone misses a shard
    rewritten at the same size, tar padding to 10,240-byte records) differs from the stamp its segment recorded
    is a fingerprint difference naming the shard. A stamp without a digest (a cache built before digests were
    recorded) is one too: checking such shards sample by sample would read the whole data at every start,
    while rerunning `mmkd cache` checks them once and records their digests. Shards whose segment has no stamp
    (built from records in a list) or whose stamp differs are read and checked sample by sample as in-memory
    data is (keys present, content digests): the expectation returned holds those records."""
    segments = {s["shard"]: s for s in cache.manifest["segments"]}
    fallback: list[Record] = []
    fallback_captioned: list[Record] = []
    lacking: list[str] = []
    changed: list[tuple[str, str, str]] = []  # (shard, its segment, what differs)
    undigested: list[str] = []
    n_shards = 0
    for records, captioned in expect.sharded:
        index, counts = records.index, records.shard_counts  # type: ignore[attr-defined]
        for s, count in enumerate(counts.tolist()):
            if not count:
                continue
            n_shards += 1
            name = index.refs[s].name
            seg = segments.get(shard_id(name))
            if seg is None:
                lacking.append(name)
                continue
            now = {"size": int(index.sizes[s]), "count": int(index.counts[s]), "sha256": index.digests[s]}
            what, no_digest = _stamp_differs(cache, seg, now)
            if no_digest:
                undigested.append(name)
            if what is None:
                continue
            if what:
                changed.append((name, seg["name"], what))
            # no stamp (built from records in a list), or a changed shard: its samples are checked one by one
            lo = int(index.offsets[s])
            recs = [records[i] for i in range(lo, lo + count)]
            fallback += recs
            if captioned:
                fallback_captioned += recs
    if lacking:
        hard.append(lacking_message(lacking, n_shards))
    soft += _shard_notes(cache, changed, undigested)
    if not fallback:
        return expect
    return replace(expect, records=[*(expect.records or []), *fallback],
                   captioned=[*(expect.captioned or []), *fallback_captioned])


def _shard_notes(cache: CacheReader, changed: list[tuple[str, str, str]], undigested: list[str]) -> list[str]:
    soft = []
    if changed:
        soft.append(f"data: {len(changed)} shard(s) changed since the cache was built: "
                    + ", ".join(f"{name!r} ({what})" for name, _, what in changed[:3])
                    + (" …" if len(changed) > 3 else "") + "; rebuild their segments: delete each one's folder "
                    f"(e.g. {cache.root / SEGMENTS / changed[0][1]}) and rerun the same `mmkd cache` command (it "
                    "computes only those shards, and names any other changed shard)")
    if undigested:
        soft.append(f"data: the cache records no content digest for {len(undigested)} shard(s) (built by an "
                    f"older mmkd), e.g. {undigested[0]!r}, so a shard rewritten at the same size would go "
                    "unnoticed: rerun the same `mmkd cache` command once (it computes nothing for complete "
                    "shards, checks their samples and records their digests)")
    return soft


def _missing(cache: CacheReader, expect: CacheExpectation, text: bool) -> list[str]:
    out = []
    records = list(expect.records or [])
    rows = cache.key_index.rows([r.key for r in records])
    absent = [r for r, row in zip(records, rows) if row < 0]
    held = set(cache.shards)
    lacking = lacking_shards(absent, held)
    if lacking:
        out.append(lacking_message(lacking, len(set(r.shard for r in records))))
        absent = [r for r in absent if shard_id(r.shard) in held]
    if absent:
        r = absent[0]
        out.append(f"{len(absent)} training sample(s) are not in it, e.g. key {r.key!r}"
                   f"{f' ({r.origin})' if r.origin and r.origin != r.key else ''}: build the cache over the "
                   "same data (mmkd cache --data SPEC, or --config with your run config)")
    if text:
        recs = expect.captioned if expect.captioned is not None else records
        recs = [r for r in recs if shard_id(r.shard) in held]  # a lacking shard's captions are named above
        wanted = sorted({c for r in recs for c in r.captions})
        lost = [c for c, row in zip(wanted, cache.caption_index.rows(wanted)) if row < 0]
        if lost:
            out.append(f"{len(lost)} caption(s) are not in it, e.g. {lost[0]!r}")
    return out


def _changed(cache: CacheReader, records: Sequence[Record]) -> list[str]:
    rows = cache.key_index.rows([r.key for r in records])
    present = [(r, int(row)) for r, row in zip(records, rows) if row >= 0]
    digests = fp.record_digests([r for r, _ in present])
    changed = []
    tables: dict[int, StringTable] = {}
    for (r, row), d in zip(present, digests):
        seg, local = cache.locate(row)
        table = tables.get(seg) or tables.setdefault(seg, StringTable(cache.folders[seg], "digests"))
        then = table[local]
        if then != d:
            changed.append((r, then, d))
    if not changed:
        return []
    r, then, d = changed[0]
    return [f"data: {len(changed)} sample(s) differ from when the cache was built, e.g. {r.key!r}"
            f"{f' ({r.origin})' if r.origin and r.origin != r.key else ''}: {then} then, {d} now"]
