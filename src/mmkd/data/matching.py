"""Binary image–text matching pairs (S2's data), with the hard negatives S2 lacked.

Every image gives ``captions_per_image`` pairs (default one, as in S2): a caption drawn from its own, kept as
a *matching* pair, or swapped for a *mismatching* caption. Images are shuffled and split into train/val/test
first, and half of each split's pairs (rounded down) keep their caption, so labels are balanced per split.

Mismatching captions:

* ``random``: a random caption of another image of the same split (S2).
* ``hard``: the caption of another image most similar to the image's own caption by a sentence encoder's
  embedding (cosine of mean-pooled MiniLM by default); on the built-in world, half of them are instead
  *attribute swaps*: one colour or shape word of the image's caption replaced by another of
  ``world.COLOURS`` / ``world.SHAPES``. ``hard_candidates="drawn"`` ranks only the captions drawn for the
  split's pairs instead of all its captions (fewer texts to encode: the world's templated captions have
  near neighbours enough).
* ``mixed``: each mismatching pair is ``random`` or ``hard`` with equal probability.

A mismatching caption is never one of the image's own captions (compared as text). On the built-in world it
also never names the same set of colours and shapes as the image's caption, so a "negative" cannot be a
correct description that happens to come from another image (the world repeats colour–shape combinations).
On other data, ``max_similarity`` drops near-paraphrases from the hard candidates for the same reason.

Output: one JSONL file, a line per pair (``split``, ``image_key``, ``image`` (the file path, or null for
in-memory images such as the world's, whose key names them), ``caption``, ``label``, ``negative``,
``caption_of``, ``replaced``: the own caption a mismatching one stands in for), and a sidecar ``FILE.meta.json``
recording the data spec and settings, so training reads the same images back by key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.data import world
from mmkd.data.records import DataError, Record
from mmkd.errors import UsageError
from mmkd.fileio import atomic_write_text

NEGATIVE_MODES = ("random", "hard", "mixed")
NEGATIVE_KINDS = ("random", "nearest", "swap")
HARD_CANDIDATES = ("all", "drawn")
SPLITS = ("train", "val", "test")
MIN_SPLIT_IMAGES = 2  # a split needs one matching and one mismatching pair, and a second image to borrow from
FORMAT_VERSION = 1

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> L2-normalised [n, d]

_COLOUR_RE = re.compile(r"\b(" + "|".join(world.COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(world.SHAPES) + r")\b")
_ATTR_RE = re.compile(r"\b(" + "|".join(world.COLOURS + world.SHAPES) + r")\b")


@dataclass(frozen=True)
class MatchPair:
    """One image–caption pair with its label (1 matching, 0 mismatching)."""

    split: str
    image_key: str
    caption: str
    label: int
    image: str | None = None  # file path of the image when it has one (for people reading the file)
    negative: str | None = None  # how a mismatching caption was chosen: random, nearest, swap
    caption_of: str | None = None  # key of the image a borrowed mismatching caption belongs to
    replaced: str | None = None  # the image's own caption that a mismatching caption stands in for

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildConfig:
    """How pairs are built; written to the sidecar so a pairs file documents itself."""

    negatives: str = "random"
    seed: int = 0
    captions_per_image: int = 1
    val_frac: float = 0.1
    test_frac: float = 0.1
    world_attributes: bool = False  # the built-in world: attribute swaps and the colour/shape guard
    max_similarity: float = 0.95  # hard candidates at or above this cosine are treated as paraphrases
    swap_fraction: float = 0.5  # on the world, the share of hard negatives that are attribute swaps
    hard_candidates: str = "all"  # nearest among every caption of the other images, or only their drawn ones

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVE_MODES:
            raise UsageError(f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {self.negatives!r}")
        if self.captions_per_image < 1:
            raise UsageError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        for name in ("val_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise UsageError(f"{name} must be in (0, 1), got {v}")
        if self.val_frac + self.test_frac >= 1.0:
            raise UsageError(f"val_frac + test_frac must be < 1 (something must be left to train on), got "
                             f"{self.val_frac} + {self.test_frac}")
        if not 0.0 < self.max_similarity <= 1.0:
            raise UsageError(f"max_similarity must be in (0, 1], got {self.max_similarity}")
        if self.hard_candidates not in HARD_CANDIDATES:
            raise UsageError(f"hard_candidates must be one of {', '.join(HARD_CANDIDATES)}, got "
                             f"{self.hard_candidates!r}")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise UsageError(f"swap_fraction must be in [0, 1], got {self.swap_fraction}")


def attribute_signature(caption: str) -> tuple[frozenset[str], frozenset[str]]:
    """The colours and shapes a built-in-world caption names; equal signatures may describe the same image."""
    return frozenset(_COLOUR_RE.findall(caption)), frozenset(_SHAPE_RE.findall(caption))


def attribute_swap(caption: str, rng: np.random.Generator) -> str | None:
    """The caption with one colour or shape word replaced by another of its kind; None if it names none."""
    hits = list(_ATTR_RE.finditer(caption))
    if not hits:
        return None
    m = hits[int(rng.integers(len(hits)))]
    word = m.group(0)
    pool = world.COLOURS if word in world.COLOURS else world.SHAPES
    new = [w for w in pool if w != word][int(rng.integers(len(pool) - 1))]
    return caption[: m.start()] + new + caption[m.end():]


def _check_records(records: Sequence[Record], cfg: BuildConfig) -> None:
    seen: set[str] = set()
    for r in records:
        where = r.origin or r.key
        if r.key in seen:
            raise DataError(f"{where}: image key {r.key!r} appears twice; keys must be unique")
        seen.add(r.key)
        distinct = len(set(r.captions))
        if distinct < cfg.captions_per_image:
            raise DataError(f"{where}: image {r.key!r} has {distinct} distinct caption(s) but "
                            f"captions_per_image={cfg.captions_per_image} asks for that many; give every "
                            "image enough captions, drop the short ones, or lower --captions-per-image")


def split_sizes(n: int, cfg: BuildConfig) -> dict[str, int]:
    """Images per split; every split gets at least MIN_SPLIT_IMAGES or the data set is too small."""
    n_val, n_test = round(n * cfg.val_frac), round(n * cfg.test_frac)
    sizes = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
    if min(sizes.values()) < MIN_SPLIT_IMAGES:
        raise DataError(
            f"data set too small to split: {n} images give train/val/test = {sizes['train']}/{sizes['val']}/"
            f"{sizes['test']} images, and every split needs at least {MIN_SPLIT_IMAGES} (one matching and one "
            "mismatching pair); add images or raise --val-frac/--test-frac")
    return sizes


@dataclass
class _SplitPool:
    """The captions of one split's images, for drawing mismatching captions."""

    records: list[Record]
    owners: dict[str, set[int]] = field(default_factory=dict)  # caption text -> indices of images having it
    texts: list[str] = field(default_factory=list)  # distinct captions, in first-seen order

    def __post_init__(self) -> None:
        for i, r in enumerate(self.records):
            for c in r.captions:
                if c not in self.owners:
                    self.owners[c] = set()
                    self.texts.append(c)
                self.owners[c].add(i)


class _NegativePicker:
    """Chooses mismatching captions for one split under the validity rules of the module docstring."""

    def __init__(self, pool: _SplitPool, cfg: BuildConfig, rng: np.random.Generator, embed: Embed | None,
                 drawn: Sequence[str]) -> None:
        self.pool, self.cfg, self.rng = pool, cfg, rng
        self.embed = embed
        # the captions the nearest-caption search ranks: all of the split's, or only the drawn ones
        self.cand = pool.texts if cfg.hard_candidates == "all" else list(dict.fromkeys(drawn))
        self._cand_emb: np.ndarray | None = None
        self._index = {t: k for k, t in enumerate(self.cand)}
        self._sig_ids: dict[tuple[frozenset[str], frozenset[str]], int] = {}
        self._cand_sig = np.array([self._sig_id(t) for t in self.cand], dtype=np.int64)

    def _sig_id(self, text: str) -> int:
        """Ids of attribute signatures on the world; every text its own id elsewhere (no guard)."""
        if not self.cfg.world_attributes:
            return -1
        return self._sig_ids.setdefault(attribute_signature(text), len(self._sig_ids))

    def valid(self, i: int, text: str, anchor: str) -> bool:
        if text in self.pool.records[i].captions:
            return False
        return not (self.cfg.world_attributes and attribute_signature(text) == attribute_signature(anchor))

    def random(self, i: int, anchor: str) -> tuple[str, str] | None:
        recs = self.pool.records
        for _ in range(64):
            j = int(self.rng.integers(len(recs)))
            if j == i:
                continue
            text = recs[j].captions[int(self.rng.integers(len(recs[j].captions)))]
            if self.valid(i, text, anchor):
                return text, recs[j].key
        # rare: most captions are invalid for this image; take any valid one in a random order
        for k in self.rng.permutation(len(self.pool.texts)):
            text = self.pool.texts[int(k)]
            if self.valid(i, text, anchor):
                return text, recs[min(self.pool.owners[text])].key
        return None

    def swap(self, i: int, anchor: str) -> str | None:
        for _ in range(16):
            text = attribute_swap(anchor, self.rng)
            if text is None:
                return None
            if self.valid(i, text, anchor):
                return text
        return None

    def nearest(self, slots: list[tuple[int, str]]) -> list[tuple[str, str] | None]:
        """For each (image, own caption): the most similar valid caption of another image of the split."""
        if not slots:
            return []
        if self.embed is None:
            raise ValueError("hard negatives need a text encoder (embed); none was given")
        texts = self.cand
        if self._cand_emb is None:
            self._cand_emb = _as_unit(self.embed(texts), len(texts))
        anchors = _as_unit(self.embed([a for _, a in slots]), len(slots))
        out: list[tuple[str, str] | None] = []
        for start in range(0, len(slots), 512):
            sims = anchors[start:start + 512] @ self._cand_emb.T
            for row, (i, anchor) in zip(sims, slots[start:start + 512]):
                bad = row >= self.cfg.max_similarity
                bad[[self._index[c] for c in self.pool.records[i].captions if c in self._index]] = True  # own
                if self.cfg.world_attributes:
                    bad |= self._cand_sig == self._sig_id(anchor)
                if bad.all():
                    out.append(None)
                    continue
                k = int(np.argmax(np.where(bad, -np.inf, row)))
                out.append((texts[k], self.pool.records[min(self.pool.owners[texts[k]])].key))
        return out


def _as_unit(emb: np.ndarray, n: int) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"text encoder returned shape {emb.shape} for {n} texts; expected [{n}, dim]")
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _image_ref(r: Record) -> str | None:
    return str(r.image) if isinstance(r.image, (str, Path)) else None


def _negative_kinds(n: int, cfg: BuildConfig, rng: np.random.Generator) -> list[str]:
    """The kind of each mismatching pair of a split, drawn before any caption is chosen."""
    hard = (np.ones(n, bool) if cfg.negatives == "hard" else
            np.zeros(n, bool) if cfg.negatives == "random" else rng.random(n) < 0.5)
    swap = cfg.world_attributes & (rng.random(n) < cfg.swap_fraction)
    return ["random" if not h else "swap" if s else "nearest" for h, s in zip(hard.tolist(), swap.tolist())]


def build_pairs(records: Sequence[Record], cfg: BuildConfig | None = None, embed: Embed | None = None
                ) -> list[MatchPair]:
    """Balanced matching/mismatching pairs in train, val and test order (see the module docstring)."""
    cfg = cfg or BuildConfig()
    records = list(records)
    _check_records(records, cfg)
    sizes = split_sizes(len(records), cfg)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(records))
    pairs: list[MatchPair] = []
    start = 0
    for split in SPLITS:
        recs = [records[int(k)] for k in order[start:start + sizes[split]]]
        start += sizes[split]
        pairs += _build_split(split, recs, cfg, rng, embed)
    return pairs


def _build_split(split: str, recs: list[Record], cfg: BuildConfig, rng: np.random.Generator,
                 embed: Embed | None) -> list[MatchPair]:
    # slots: (image index, its drawn caption); shuffled, then the first half keeps its caption
    slots: list[tuple[int, str]] = []
    for i, r in enumerate(recs):
        distinct = list(dict.fromkeys(r.captions))
        for k in rng.choice(len(distinct), size=cfg.captions_per_image, replace=False):
            slots.append((i, distinct[int(k)]))
    slots = [slots[int(k)] for k in rng.permutation(len(slots))]
    n_pos = len(slots) // 2
    positives, negatives = slots[:n_pos], slots[n_pos:]
    kinds = _negative_kinds(len(negatives), cfg, rng)
    picker = _NegativePicker(_SplitPool(recs), cfg, rng, embed, [c for _, c in slots])

    chosen: list[tuple[str, str | None, str] | None] = [None] * len(negatives)  # (caption, caption_of, kind)
    for n, ((i, anchor), kind) in enumerate(zip(negatives, kinds)):
        if kind == "swap":
            text = picker.swap(i, anchor)
            if text is not None:
                chosen[n] = (text, None, "swap")
            else:  # the caption names no attribute: fall back to the nearest caption
                kinds[n] = "nearest"
        elif kind == "random":
            got = picker.random(i, anchor)
            if got is not None:
                chosen[n] = (got[0], got[1], "random")
    near = [n for n, k in enumerate(kinds) if k == "nearest"]
    for n, got in zip(near, picker.nearest([negatives[n] for n in near])):
        if got is not None:
            chosen[n] = (got[0], got[1], "nearest")

    out = [MatchPair(split, recs[i].key, caption, 1, _image_ref(recs[i])) for i, caption in positives]
    for (i, anchor), pick in zip(negatives, chosen):
        if pick is None:
            raise DataError(f"{split} split: no valid mismatching caption for image {recs[i].key!r} (every caption "
                            "of the split is its own or describes the same objects); add more varied images")
        out.append(MatchPair(split, recs[i].key, pick[0], 0, _image_ref(recs[i]), pick[2], pick[1], anchor))
    return [out[int(k)] for k in rng.permutation(len(out))]


def summarize(pairs: Sequence[MatchPair]) -> dict[str, dict[str, int]]:
    """Counts per split: pairs, positives, negatives and each negative kind."""
    out: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        ps = [p for p in pairs if p.split == s]
        row = {"pairs": len(ps), "matching": sum(p.label for p in ps),
               "mismatching": sum(1 - p.label for p in ps)}
        row.update({k: sum(p.negative == k for p in ps) for k in NEGATIVE_KINDS})
        out[s] = row
    return out


# ------------------------------------------------------------------------------------------------ files


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def write_pairs(path: str | Path, pairs: Sequence[MatchPair], meta: dict[str, Any]) -> Path:
    """Write the pairs JSONL and its sidecar atomically (the pairs first: a sidecar always has its pairs)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))
    full = {"format": FORMAT_VERSION, **meta, "counts": summarize(pairs)}
    atomic_write_text(meta_path(path), json.dumps(full, indent=2))
    return path


@dataclass
class PairSet:
    """A pairs file read back: its settings (sidecar) and its pairs, per split."""

    path: Path
    meta: dict[str, Any]
    pairs: list[MatchPair]

    def split(self, name: str) -> list[MatchPair]:
        return [p for p in self.pairs if p.split == name]


_FIELDS = {f for f in MatchPair.__dataclass_fields__}


def read_pairs(path: str | Path) -> PairSet:
    """Read a pairs file and its sidecar; every bad line is reported with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} not found; build it with `mmkd matching build --data SPEC --out {path}`")
    mpath = meta_path(path)
    if not mpath.is_file():
        raise DataError(f"{mpath} not found: it is written beside the pairs file by `mmkd matching build` and "
                        "names the data set the image keys refer to; rebuild the pairs")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath}: not valid JSON ({e}); rebuild the pairs") from None
    if not isinstance(meta, dict) or "data" not in meta:
        raise DataError(f"{mpath}: has no 'data' field; rebuild the pairs with `mmkd matching build`")
    pairs: list[MatchPair] = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object per line")
        missing = {"split", "image_key", "caption", "label"} - set(obj)
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        if obj["split"] not in SPLITS:
            raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {obj['split']!r}")
        if obj["label"] not in (0, 1) or isinstance(obj["label"], bool):
            raise DataError(f"{where}: label must be 0 or 1, got {obj['label']!r}")
        if not isinstance(obj["caption"], str) or not obj["caption"].strip():
            raise DataError(f"{where}: caption must be a non-empty string")
        pairs.append(MatchPair(**{k: v for k, v in obj.items() if k in _FIELDS}))
    for s in SPLITS:
        labels = {p.label for p in pairs if p.split == s}
        if labels != {0, 1}:
            raise DataError(f"{path}: the {s} split needs both matching and mismatching pairs, has labels "
                            f"{sorted(labels)}; rebuild the pairs")
    return PairSet(path, meta, pairs)


def build_pairs_file(spec: str, out: str | Path, cfg: BuildConfig, cache_dir: str | Path = "runs/.cache",
                     world_n: int = 4000, embed: Embed | None = None, limit: int | None = None,
                     text_encoder: str | None = None) -> tuple[Path, dict[str, dict[str, int]]]:
    """Read a data spec, build the pairs and write them (with the sidecar); returns the path and the counts.

    ``world:`` specs turn on the world's attribute swaps and colour/shape guard. Hard or mixed negatives load
    the sentence encoder (``text_encoder`` folder, default all-MiniLM-L6-v2) unless ``embed`` is given.
    """
    from dataclasses import replace

    from mmkd.data.resolve import records_from_spec

    is_world = spec.startswith("world:")
    cfg = replace(cfg, world_attributes=is_world)
    records = records_from_spec(spec, cache_dir, world_n=world_n)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    encoder_name = getattr(embed, "path", None)
    if embed is None and cfg.negatives != "random":
        from mmkd.matching.text import TextEncoder

        enc = TextEncoder(text_encoder)
        embed, encoder_name = enc, enc.path
    pairs = build_pairs(records, cfg, embed)
    meta = {"data": spec, "world_n": world_n if is_world else None,
            "cache": str(Path(cache_dir).resolve()) if is_world else None, "limit": limit,
            "text_encoder": encoder_name, "build": asdict(cfg)}
    path = write_pairs(out, pairs, meta)
    return path, summarize(pairs)
