"""Spread over seeds and bootstrap intervals over test images, for telling a real difference from noise.

A leaderboard row of a grid point run with S seeds holds, per test image, the fraction of its seeds that got
the image right. Resampling the test images with replacement (``RESAMPLES`` times, a fixed seed, so the board
is the same every time it is written) gives a 95% interval of the row's top-1, and, resampling the run and its
from-scratch reference with the *same* images, of their difference (a paired bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
_CHUNK = 100  # resamples drawn at once (bounds memory for large test sets)


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1); sd is None for fewer than two values; None when any is None."""
    if not values or any(v is None for v in values):
        return None, None
    xs = [float(v) for v in values]  # type: ignore[arg-type]
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def per_image_rate(hits_by_seed: Sequence[np.ndarray]) -> np.ndarray | None:
    """[N] fraction of seeds right on each image; None when a seed lacks per-image results or sizes differ."""
    if not hits_by_seed or any(h is None for h in hits_by_seed) or len({h.size for h in hits_by_seed}) != 1:
        return None
    return np.mean(np.stack([h.astype(np.float64) for h in hits_by_seed]), axis=0)


def bootstrap_interval(per_image: np.ndarray, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean of ``per_image`` over test images resampled with replacement.

    The draws depend only on (seed, number of images), so a run and its reference resampled separately see the
    same images, and ``per_image`` may be a difference (run − reference) for a paired interval."""
    n = per_image.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        k = min(_CHUNK, resamples - start)
        means[start:start + k] = per_image[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def beyond_noise(d_mean: float | None, d_interval: tuple[float, float] | None, sd_run: float | None,
                 sd_ref: float | None) -> bool | None:
    """Whether a Δ top-1 vs the scratch reference is more than noise (README, "Comparing objectives"):

    - its paired bootstrap interval over test images excludes 0, and
    - with ≥ 2 seeds, |mean Δ| exceeds the combined spread over seeds, sqrt(sd_run² + sd_ref²).

    None when neither test can be made (one seed and no per-image results)."""
    if d_mean is None:
        return None
    tests = []
    if d_interval is not None:
        tests.append(d_interval[0] > 0 or d_interval[1] < 0)
    if sd_run is not None and sd_ref is not None:
        tests.append(abs(d_mean) > math.hypot(sd_run, sd_ref))
    return all(tests) if tests else None
