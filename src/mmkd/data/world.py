"""The built-in procedural world: mmkd's default demo data.

Every image shows one or two coloured shapes (circle, square, ... in red, green, ...) of a given size at a
given place on a low-saturation background (flat tints, gradients, stripes, checks, mottled), with pixel
noise, and comes with 3-5 English captions ("a small red circle on the left", "a yellow star above a
large purple heart") written from the actual drawn positions.

Why it exists: ``make demo`` must run end to end on a laptop CPU in minutes, offline, with no data
download, yet exercise the real pipeline: a teacher dual encoder is trained on a big ``pool`` split, a
student is distilled on a small captioned ``train`` subset, and both are scored by retrieval and by
zero-shot classification on ``val``/``test`` (single-object, so every image has a ``shape``, ``colour`` and
``colour_shape`` label and the prompts from :func:`class_sets`/:func:`templates` have one right answer).
That mirrors real use (a teacher trained on web-scale pairs, students on a small in-domain set) at a
scale where the whole loop takes minutes.

Design choices:

* Shapes are large relative to the frame (small ~11-13 px, large ~16-20 px at 32 px, scaled with the
  image size): at 32 px the bottleneck of a small ViT is shape recognition, and tiny shapes are barely
  learnable.
* Object colours are saturated and well separated in hue; backgrounds are kept near grey so a background
  is never mistaken for an object colour. Colour names avoid leading vowels so that ``"a {}"`` prompts
  stay grammatical for every class.
* Generation is numpy only, vectorised over chunks of images with anti-aliased masks precomputed per
  (shape, pixel size, rotation), so tens of thousands of images take seconds.
* Determinism: chunk ``c`` of split ``s`` is drawn from ``default_rng([seed, crc32(s), c])``, so the same
  (n, seed, config, split) gives identical bytes whatever else was generated before, a larger ``n``
  extends a smaller one (image ``i`` and key ``f"{split}-{i:07d}"`` always mean the same thing, which
  keeps key-addressed teacher caches valid), and different splits never share images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from mmkd.data.world_draw import ROTATIONS_DEG, backgrounds, mask_bank, paste, size_ranges
from mmkd.fileio import atomic_write

if TYPE_CHECKING:
    from mmkd.data.records import Record

log = logging.getLogger(__name__)

# Bump when the drawing or caption code changes, so stale disk caches are not reused.
FORMAT_VERSION = 1
# Images per independently seeded chunk; fixed so that image i does not depend on n.
_CHUNK = 256

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "heart", "diamond", "ring")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "pink", "cyan", "brown")
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test", "pool")

# Saturated, hue-separated object colours in [0, 1] (order matches COLOURS).
_COLOUR_RGB: tuple[tuple[float, float, float], ...] = (
    (0.86, 0.14, 0.14),  # red
    (0.15, 0.66, 0.22),  # green
    (0.16, 0.32, 0.92),  # blue
    (0.95, 0.85, 0.14),  # yellow
    (0.55, 0.22, 0.80),  # purple
    (0.98, 0.52, 0.78),  # pink
    (0.12, 0.83, 0.87),  # cyan
    (0.55, 0.32, 0.13),  # brown
)
_COLOUR_JITTER = 0.045  # per-channel uniform jitter; far below the distance between any two colours
_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")

_POSITION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("in the top left corner", "at the top left"),
    ("at the top", "near the top"),
    ("in the top right corner", "at the top right"),
    ("on the left", "on the left side"),
    ("in the centre", "in the middle"),
    ("on the right", "on the right side"),
    ("in the bottom left corner", "at the bottom left"),
    ("at the bottom", "near the bottom"),
    ("in the bottom right corner", "at the bottom right"),
)
# caption words of world_draw.BG_STYLES, in its order
_BG_STYLE_WORD: tuple[str, ...] = ("", " shaded", " striped", " checkered", " mottled")

# Caption templates. Fields: s size, c colour, h shape, p position phrase, b background phrase.
# Every single-object template names the colour and the shape, so each caption identifies the object.
_SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {s} {c} {h} {p}",
    "a {c} {h} {p}",
    "a {c} {h}",
    "a picture of a {c} {h}",
    "a photo of a {c} {h}",
    "a {s} {c} {h}",
    "an image of a {c} {h} {p}",
    "there is a {c} {h} {p}",
    "a {c} {h} on a {b} background",
    "a {s} {c} {h} on a {b} background",
    "a drawing of a {c} {h}",
    "the {c} {h} is {p}",
    "a {c} object shaped like a {h}",
    "a {c} shape, a {s} {h}, {p}",
    "a {s} {h} shape, coloured {c}",
)
# Two-object templates. A, B: object phrases; r: relation of A to B, q: relation of B to A;
# pa, pb: position phrases; b: background phrase.
_PAIR_TEMPLATES: tuple[str, ...] = (
    "a {A} {r} a {B}",
    "a {B} {q} a {A}",
    "an image of a {A} {r} a {B}",
    "a picture of a {B} {q} a {A}",
    "a {A} and a {B}",
    "two shapes: a {A} and a {B}",
    "a {A} {pa} and a {B} {pb}",
    "a {A} {r} a {B} on a {b} background",
)
# (axis 0=y 1=x, sign of B - A along it) -> relation of A to B
_RELATIONS: Mapping[tuple[int, int], str] = MappingProxyType({
    (1, 1): "to the left of", (1, -1): "to the right of", (0, 1): "above", (0, -1): "below",
})

_ZERO_SHOT_TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "colour_shape": ("a {}", "a picture of a {}", "an image of a {}", "a photo of a {}", "a drawing of a {}",
                     "there is a {}"),
    "shape": ("a {}", "a picture of a {}", "an image of a {}", "a {} shape", "a drawing of a {}"),
    "colour": ("a {} object", "a {} shape", "a picture of a {} object", "an image of a {} shape"),
    "size": ("a {} shape", "a {} object", "a picture of a {} shape"),
})


@dataclass(frozen=True)
class WorldConfig:
    """How images are drawn. Part of the cache key: any change gives a different dataset."""

    image_size: int = 32
    max_objects: int = 2  # 1 or 2
    two_object_fraction: float = 0.3
    noise: float = 0.04  # std of pixel noise in [0,1] units

    def __post_init__(self) -> None:
        if self.image_size < 24:
            raise ValueError(f"WorldConfig.image_size must be >= 24 got {self.image_size}")
        if self.max_objects not in (1, 2):
            raise ValueError(f"WorldConfig.max_objects must be 1 or 2, got {self.max_objects}")
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError(f"WorldConfig.two_object_fraction must be in [0, 1], got "
                             f"{self.two_object_fraction}")
        if self.noise < 0:
            raise ValueError(f"WorldConfig.noise must be >= 0, got {self.noise}")


@dataclass
class WorldSplit:
    """A generated split: images, captions, labels and stable keys, all aligned by index."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[list[str]]  # >= 1 per image
    labels: dict[str, np.ndarray]  # "shape", "colour", "colour_shape", "size", "position"; -1 for two objects
    keys: list[str]  # unique, stable: f"{split}-{index:07d}"

    def __post_init__(self) -> None:
        n = len(self.images)
        lens = {len(self.captions), len(self.keys), *(len(v) for v in self.labels.values())}
        if lens != {n}:
            raise ValueError(f"WorldSplit fields disagree in length: images {n}, others {sorted(lens)}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: slice | Sequence[int] | np.ndarray) -> WorldSplit:
        """Rows ``idx`` (slice, int indices or boolean mask); keys are kept, so caches stay valid."""
        rows = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {rows.shape}, expected ({len(self)},)")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        return WorldSplit(
            images=self.images[rows],
            captions=[list(self.captions[i]) for i in rows],
            labels={k: v[rows] for k, v in self.labels.items()},
            keys=[self.keys[i] for i in rows],
        )


def _fix_articles(text: str) -> str:
    """'a orange' -> 'an orange', in case a name with a leading vowel is ever added."""
    return _A_BEFORE_VOWEL.sub("an ", text) if "a " in text else text


def _chunk(rng: np.random.Generator, m: int, cfg: WorldConfig, single_object: bool,
           masks: dict[int, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], list[list[str]]]:
    """Draw m images with labels and captions from one generator."""
    size, n_sh, n_col = cfg.image_size, len(SHAPES), len(COLOURS)
    (s0, s1), (l0, l1) = size_ranges(size)
    margin = max(1, round(size / 32))

    allow_two = not single_object and cfg.max_objects == 2
    two = (rng.random(m) < cfg.two_object_fraction) & allow_two
    shape = rng.integers(0, n_sh, (m, 2))
    colour = rng.integers(0, n_col, (m, 2))
    big = rng.integers(0, 2, (m, 2))
    k_small, k_large = rng.integers(s0, s1 + 1, (m, 2)), rng.integers(l0, l1 + 1, (m, 2))
    k = np.where(big == 1, k_large, k_small)
    rot = rng.integers(0, len(ROTATIONS_DEG), (m, 2))
    col_rgb = np.asarray(_COLOUR_RGB)[colour] + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, (m, 2, 3))
    cell = rng.integers(0, 3, (m, 2, 2))  # (row, col) grid cell per object
    jitter = rng.integers(-margin, margin + 1, (m, 2, 2))
    axis = rng.integers(0, 2, m)  # two objects: separated along 0 = y (above/below) or 1 = x (left/right)
    first_low = rng.integers(0, 2, m)

    # Two objects must differ, and must fit next to each other without overlapping much.
    same = two & (shape[:, 0] == shape[:, 1]) & (colour[:, 0] == colour[:, 1])
    shape[same, 1] = (shape[same, 1] + rng.integers(1, n_sh, m)[same]) % n_sh
    limit = size - 2 * margin + round(0.1 * size)  # at most a sliver of bounding-box overlap
    crowded = two & (k[:, 0] + k[:, 1] > limit)
    big[crowded, 1] = 0
    k[crowded, 1] = np.minimum(k_small[crowded, 1], np.maximum(limit - k[crowded, 0], s0))
    along = np.stack([1 - first_low, first_low], axis=1) * 2  # 0 (low end) or 2 (high end) per object
    ax_rows = np.flatnonzero(two)
    cell[ax_rows, :, axis[ax_rows]] = along[ax_rows]
    # Along the separating axis, jitter only pushes the two objects apart.
    jit_ax = jitter[ax_rows, :, axis[ax_rows]]
    jitter[ax_rows, :, axis[ax_rows]] = np.where(along[ax_rows] == 0, -np.abs(jit_ax), np.abs(jit_ax))

    # Grid cell -> top-left pixel: low end, centred, or high end of the free range, plus jitter.
    free = size - k[..., None]
    base = np.where(cell == 0, margin, np.where(cell == 1, free // 2, free - margin))
    yx0 = np.clip(base + jitter, 0, size - k[..., None])

    img, bg_style, bg_level = backgrounds(rng, m, size)
    for obj, rows in ((0, np.arange(m)), (1, ax_rows)):
        if rows.size == 0:
            continue
        alpha = np.zeros((rows.size, size, size), dtype=np.float32)
        paste(alpha, np.arange(rows.size), shape[rows, obj], rot[rows, obj], k[rows, obj], yx0[rows, obj, 0],
               yx0[rows, obj, 1], masks)
        col = col_rgb[rows, obj].astype(np.float32)[:, None, None, :]
        if obj == 0:  # every image: update in place, no gathers
            img += alpha[..., None] * (col - img)
        else:
            sub = img[rows]
            img[rows] = sub + alpha[..., None] * (col - sub)
    if cfg.noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise)
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    images = img.astype(np.uint8)

    neg = np.full(m, -1, dtype=np.int64)
    single = ~two
    labels = {
        "shape": np.where(single, shape[:, 0], neg),
        "colour": np.where(single, colour[:, 0], neg),
        "colour_shape": np.where(single, colour[:, 0] * n_sh + shape[:, 0], neg),
        "size": np.where(single, big[:, 0], neg),
        "position": np.where(single, cell[:, 0, 0] * 3 + cell[:, 0, 1], neg),
    }
    labels = {key: v.astype(np.int64) for key, v in labels.items()}

    # Captions: random template order per image, 3-5 captions, phrase variants from pre-drawn uniforms.
    n_caps = rng.integers(3, 6, m).tolist()
    order_single = np.argsort(rng.random((m, len(_SINGLE_TEMPLATES))), axis=1).tolist()
    order_pair = np.argsort(rng.random((m, len(_PAIR_TEMPLATES))), axis=1).tolist()
    u = rng.random((m, 2, 2))  # per object: position phrase variant; include the size word (pairs)
    variant, with_size = (u[..., 0] * 2).astype(int).tolist(), (u[..., 1] < 0.5).tolist()
    centre = (yx0 + k[..., None] / 2.0).tolist()
    pos = (cell[..., 0] * 3 + cell[..., 1]).tolist()
    bg_words = [("dark", "grey", "light")[lv] + _BG_STYLE_WORD[st]
                for lv, st in zip(bg_level.tolist(), bg_style.tolist())]
    two_l, axis_l = two.tolist(), axis.tolist()
    shape_l, colour_l, big_l = shape.tolist(), colour.tolist(), big.tolist()
    captions: list[list[str]] = []
    for i in range(m):
        pos_ph = [_POSITION_PHRASES[pos[i][o]][variant[i][o]] for o in range(2)]
        sh, co, bi = shape_l[i], colour_l[i], big_l[i]
        if not two_l[i]:
            fields = {"s": SIZES[bi[0]], "c": COLOURS[co[0]], "h": SHAPES[sh[0]], "p": pos_ph[0],
                      "b": bg_words[i]}
            caps = [_SINGLE_TEMPLATES[j].format(**fields) for j in order_single[i][: n_caps[i]]]
        else:
            ax = axis_l[i]
            sign = 1 if centre[i][1][ax] > centre[i][0][ax] else -1
            phr = [(SIZES[bi[o]] + " " if with_size[i][o] else "") + f"{COLOURS[co[o]]} {SHAPES[sh[o]]}"
                   for o in range(2)]
            fields = {"A": phr[0], "B": phr[1], "r": _RELATIONS[(ax, sign)], "q": _RELATIONS[(ax, -sign)],
                      "pa": pos_ph[0], "pb": pos_ph[1], "b": bg_words[i]}
            caps = [_PAIR_TEMPLATES[j].format(**fields) for j in order_pair[i][: n_caps[i]]]
        captions.append([_fix_articles(c) for c in caps])
    return images, labels, captions


# ----------------------------------------------------------------------------------------------------------
# Public API


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def generate(n: int, seed: int, config: WorldConfig = WorldConfig(), split: str = "train",
             single_object: bool = False) -> WorldSplit:
    """Draw ``n`` images of ``split``; identical output for identical arguments, and a prefix of any larger n.

    ``single_object=True`` forces one object per image so every image has zero-shot labels.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not split:
        raise ValueError("split name must be non-empty")
    masks = mask_bank(config.image_size, SHAPES)
    parts = []
    for c in range((n + _CHUNK - 1) // _CHUNK):
        rng = np.random.default_rng([seed, _split_code(split), c, int(single_object)])
        parts.append(_chunk(rng, _CHUNK, config, single_object, masks))
    s = config.image_size
    images = np.concatenate([p[0] for p in parts])[:n] if parts else np.zeros((0, s, s, 3), np.uint8)
    label_names = ("shape", "colour", "colour_shape", "size", "position")
    labels = {
        name: (np.concatenate([p[1][name] for p in parts])[:n] if parts else np.zeros(0, np.int64))
        for name in label_names
    }
    captions = [cap for p in parts for cap in p[2]][:n]
    keys = [f"{split}-{i:07d}" for i in range(n)]
    return WorldSplit(images=np.ascontiguousarray(images), captions=captions, labels=labels, keys=keys)


def class_sets() -> dict[str, list[str]]:
    """Zero-shot class names; list index == label value (colour_shape: colour_idx * n_shapes + shape_idx)."""
    return {
        "shape": list(SHAPES),
        "colour": list(COLOURS),
        "colour_shape": [f"{c} {s}" for c in COLOURS for s in SHAPES],
        "size": list(SIZES),
    }


def templates(class_set: str) -> list[str]:
    """Prompt templates (``{}`` = class name) phrased like the captions, so prompts land near them."""
    try:
        return list(_ZERO_SHOT_TEMPLATES[class_set])
    except KeyError:
        known = sorted(_ZERO_SHOT_TEMPLATES)
        raise KeyError(f"unknown class set {class_set!r}; choose from {known}") from None


def _cache_path(cache_dir: Path, split: str, n: int, config: WorldConfig, seed: int) -> Path:
    settings = {"format": FORMAT_VERSION, "split": split, "n": n, "seed": seed, "config": asdict(config)}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"world-{split}-n{n}-seed{seed}-{digest}.npz"


def _save(path: Path, data: WorldSplit) -> None:
    """Write atomically: a reader sees the old file or the complete new one, never a partial file."""
    flat = [c for caps in data.captions for c in caps]
    arrays = {
        "images": data.images,
        "keys": np.array(data.keys, dtype=str),
        "captions": np.array(flat, dtype=str),
        "caption_counts": np.array([len(c) for c in data.captions], dtype=np.int64),
        **{f"label_{k}": v for k, v in data.labels.items()},
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _load(path: Path, n: int, image_size: int) -> WorldSplit:
    with np.load(path, allow_pickle=False) as z:
        counts = z["caption_counts"]
        flat = z["captions"].tolist()
        ends = np.cumsum(counts)
        captions = [flat[e - c: e] for c, e in zip(counts.tolist(), ends.tolist())]
        data = WorldSplit(
            images=z["images"],
            captions=captions,
            labels={f[len("label_"):]: z[f] for f in z.files if f.startswith("label_")},
            keys=z["keys"].tolist(),
        )
    if data.images.shape != (n, image_size, image_size, 3) or data.images.dtype != np.uint8:
        raise ValueError(f"cached images have shape {data.images.shape} {data.images.dtype}")
    if len(flat) != int(counts.sum()):
        raise ValueError("caption counts do not match captions")
    return data


def load_split(split: str, n: int, cache_dir: str | Path, config: WorldConfig = WorldConfig(),
               seed: int = 0) -> WorldSplit:
    """Generate (or read from ``cache_dir``) ``n`` images of a named split.

    Splits draw from distinct seeds, so they never share images; ``val`` and ``test`` are single-object so
    zero-shot labels exist for every image. A cache file that cannot be read is regenerated and rewritten.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = _cache_path(cache, split, n, config, seed)
    if path.exists():
        try:
            return _load(path, n, config.image_size)
        except Exception as e:  # corrupt/truncated/foreign file: regenerate rather than fail the run
            log.warning("world cache %s unreadable (%s); regenerating", path, e)
    data = generate(n, seed, config, split=split, single_object=split in ("val", "test"))
    _save(path, data)
    return data


def to_records(split: WorldSplit) -> list[Record]:
    """Records for the generic data pipeline; label is colour_shape (None for two-object images)."""
    from mmkd.data.records import Record

    cs = split.labels["colour_shape"]
    return [
        Record(key=key, image=split.images[i], captions=tuple(split.captions[i]),
               label=int(cs[i]) if cs[i] >= 0 else None, origin=key)
        for i, key in enumerate(split.keys)
    ]
