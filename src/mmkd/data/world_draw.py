"""The built-in world's pixels: shape masks, backgrounds and pasting (``world.py`` decides what to draw).

Kept apart from the captions, labels and caching of ``world.py`` because it is pure array drawing. Any change
here changes the images: bump ``world.FORMAT_VERSION`` so stale disk caches are not reused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

ROTATIONS_DEG: tuple[float, ...] = (-12.0, 0.0, 12.0)
BG_STYLES: tuple[str, ...] = ("flat", "gradient", "stripes", "checks", "mottled")
BG_STYLE_P: tuple[float, ...] = (0.3, 0.3, 0.13, 0.13, 0.14)


# ----------------------------------------------------------------------------------------------------------
# Shapes: implicit functions on u, v in [-1, 1] (v grows downwards), rasterised once per pixel size.


def _in_polygon(u: np.ndarray, v: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points (pts: [K, 2] vertices)."""
    inside = np.zeros(u.shape, dtype=bool)
    x1, y1 = pts[-1]
    for x2, y2 in pts:
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
        x1, y1 = x2, y2
    return inside


def _star_points(outer: float = 1.0, inner: float = 0.46) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, outer, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang) + 0.08], axis=1)


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = u * 1.2, -v * 1.2 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


SHAPE_FNS: Mapping[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = MappingProxyType({
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.84,
    "triangle": lambda u, v: _in_polygon(u, v, np.array([[0.0, -0.98], [1.0, 0.8], [-1.0, 0.8]])),
    "cross": lambda u, v: (np.minimum(abs(u), abs(v)) <= 0.32) & (np.maximum(abs(u), abs(v)) <= 0.98),
    "star": lambda u, v: _in_polygon(u, v, _star_points()),
    "heart": _heart,
    "diamond": lambda u, v: np.abs(u) / 0.86 + np.abs(v) <= 1.0,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.52**2),
})


def _rasterise(shape: str, k: int, angle_deg: float, supersample: int = 4) -> np.ndarray:
    """Anti-aliased alpha mask [k, k] in [0, 1] of a shape rotated by angle_deg."""
    ss = supersample
    c = ((np.arange(k * ss) + 0.5) / (k * ss)) * 2.0 - 1.0
    v, u = np.meshgrid(c, c, indexing="ij")
    a = np.deg2rad(angle_deg)
    ur, vr = np.cos(a) * u + np.sin(a) * v, -np.sin(a) * u + np.cos(a) * v
    hit = SHAPE_FNS[shape](ur, vr).astype(np.float32)
    return hit.reshape(k, ss, k, ss).mean(axis=(1, 3))


def size_ranges(image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive pixel ranges of (small, large) objects: 11-13 and 16-20 px at 32 px, scaled."""
    s = image_size / 32.0
    return (round(11 * s), round(13 * s)), (round(16 * s), round(20 * s))


def mask_bank(image_size: int, shapes: Sequence[str]) -> dict[int, np.ndarray]:
    """Masks per pixel size k: float32 [n_shapes, n_rotations, k, k]. Built per call (cheap, no globals)."""
    (s0, s1), (l0, l1) = size_ranges(image_size)
    ks = sorted(set(range(s0, s1 + 1)) | set(range(l0, l1 + 1)))
    return {k: np.array([[_rasterise(sh, k, a) for a in ROTATIONS_DEG] for sh in shapes]) for k in ks}


# ----------------------------------------------------------------------------------------------------------
# Drawing


def backgrounds(rng: np.random.Generator, m: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low-saturation backgrounds float32 [m, H, W, 3], plus style index and level word index per image."""
    style = rng.choice(len(BG_STYLES), size=m, p=BG_STYLE_P)
    level_bin = rng.integers(0, 3, m)
    lo = np.array([0.05, 0.36, 0.66])[level_bin]
    level = lo + rng.random(m) * 0.26
    c1 = level[:, None] + rng.uniform(-0.035, 0.035, (m, 3))
    # Direction of the second colour: towards mid-grey, so gradients and textures stay in range.
    sign = np.where(level_bin == 0, 1.0, np.where(level_bin == 2, -1.0, rng.choice([-1.0, 1.0], m)))
    contrast = np.where(style == 1, rng.uniform(0.12, 0.3, m), rng.uniform(0.05, 0.12, m))
    contrast[style == 0] = 0.0
    c2 = c1 + (sign * contrast)[:, None] + rng.uniform(-0.02, 0.02, (m, 3))
    c1, c2 = np.clip(c1, 0.0, 1.0), np.clip(c2, 0.0, 1.0)

    t = np.zeros((m, size, size), dtype=np.float32)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = grid[None, :, None], grid[None, None, :]
    theta = rng.uniform(0, 2 * np.pi, m)
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, m).astype(np.float32)
    period = (rng.uniform(3.0, 8.0, m) * size / 32.0).astype(np.float32)
    cell = rng.integers(3, 7, m) * max(1, round(size / 32))
    offset = rng.integers(0, 8, (m, 2))
    coarse = rng.random((m, 6, 6)).astype(np.float32)

    def project(rows: np.ndarray) -> np.ndarray:  # [r, H, W] position along each image's direction
        return xx * cos[rows, None, None] + yy * sin[rows, None, None]

    idx = np.flatnonzero(style == 1)  # gradient along a random direction, rescaled to [0, 1]
    if idx.size:
        cs, sn = cos[idx, None, None], sin[idx, None, None]
        pmin = np.minimum(cs, 0) + np.minimum(sn, 0)
        pmax = np.maximum(cs, 0) + np.maximum(sn, 0)
        t[idx] = (project(idx) - pmin) / np.maximum(pmax - pmin, 1e-6)
    idx = np.flatnonzero(style == 2)  # sinusoidal stripes
    if idx.size:
        wave = project(idx) * (2 * np.pi * size / period[idx, None, None]) + phase[idx, None, None]
        t[idx] = 0.5 + 0.5 * np.sin(wave)
    idx = np.flatnonzero(style == 3)  # checks
    if idx.size:
        ar = np.arange(size)
        cy = (ar[None, :] + offset[idx, :1]) // cell[idx, None]
        cx = (ar[None, :] + offset[idx, 1:]) // cell[idx, None]
        t[idx] = ((cy[:, :, None] + cx[:, None, :]) % 2).astype(np.float32)
    idx = np.flatnonzero(style == 4)  # mottled: bilinear upsampling of a coarse random grid
    if idx.size:
        pos = grid * 5.0
        i0 = np.minimum(pos.astype(int), 4)
        w = pos - i0
        up = np.zeros((size, 6), dtype=np.float32)
        up[np.arange(size), i0] = 1 - w
        up[np.arange(size), i0 + 1] = w
        t[idx] = up @ coarse[idx] @ up.T

    c1, dc = c1.astype(np.float32), (c2 - c1).astype(np.float32)
    bg = c1[:, None, None, :] + dc[:, None, None, :] * t[..., None]
    mean_level = c1.mean(1) + dc.mean(1) / 2
    level_word = np.digitize(mean_level, [0.34, 0.63])  # 0 dark, 1 grey, 2 light
    return bg, style, level_word


def paste(alpha: np.ndarray, rows: np.ndarray, shape: np.ndarray, rot: np.ndarray, k: np.ndarray,
           y0: np.ndarray, x0: np.ndarray, masks: dict[int, np.ndarray]) -> None:
    """Write object masks into alpha[rows] at (y0, x0); grouped by pixel size so each group is one gather."""
    for kk in np.unique(k):
        sel = k == kk
        ar = np.arange(kk)
        r, yy, xx = rows[sel], y0[sel], x0[sel]
        ys, xs = yy[:, None, None] + ar[None, :, None], xx[:, None, None] + ar[None, None, :]
        alpha[r[:, None, None], ys, xs] = masks[int(kk)][shape[sel], rot[sel]]
