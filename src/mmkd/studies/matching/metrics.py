"""Binary matching metrics in numpy: accuracy, precision, recall, F1, ROC-AUC, threshold, confusion table.

The decision threshold is chosen on the validation split (the one maximising accuracy; labels are
balanced) and applied unchanged to the test split, so test numbers never see test labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "roc_auc")


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y.astype(np.int64)


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting ½.

    Computed from average ranks (the Mann–Whitney U statistic); NaN when one class is absent.
    """
    s, y = _check(np.asarray(scores), np.asarray(labels))
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank (1-based) within each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts with prediction = score ≥ threshold."""
    s, y = _check(scores, labels)
    pred = (s >= threshold).astype(np.int64)
    return {"tp": int(((pred == 1) & (y == 1)).sum()), "fp": int(((pred == 1) & (y == 0)).sum()),
            "tn": int(((pred == 0) & (y == 0)).sum()), "fn": int(((pred == 0) & (y == 1)).sum())}


def binary_metrics(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                   threshold: float = 0.0) -> dict[str, Any]:
    """accuracy, precision, recall, f1, roc_auc (fractions), the threshold and the confusion counts."""
    s, y = _check(np.asarray(scores), np.asarray(labels))
    c = confusion(s, y, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(y) if len(y) else float("nan"), "precision": precision,
            "recall": recall, "f1": f1, "roc_auc": roc_auc(s, y), "threshold": float(threshold), "confusion": c}


def choose_threshold(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """The threshold with the best accuracy on these (validation) scores; midpoints between distinct scores.

    Ties go to the candidate nearest the middle of the tied range, so the choice does not hug one score.
    """
    s, y = _check(np.asarray(scores), np.asarray(labels))
    u = np.unique(s)
    cands = np.r_[u[0] - 1.0, (u[1:] + u[:-1]) / 2.0, u[-1] + 1.0] if len(u) else np.array([0.0])
    # accuracy of "score >= c" for every candidate, from sorted scores (O(n log n))
    order = np.argsort(s)
    ss, yy = s[order], y[order]
    below = np.searchsorted(ss, cands, side="left")  # items predicted 0
    neg_below = np.r_[0, np.cumsum(1 - yy)][below]
    pos_above = int(yy.sum()) - np.r_[0, np.cumsum(yy)][below]
    acc = (neg_below + pos_above) / max(1, len(s))
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[len(best) // 2]])


def confusion_table(c: dict[str, int]) -> str:
    """A 2×2 Markdown table, rows = truth, columns = prediction."""
    return "\n".join([
        "| truth \\ predicted | matching | mismatching |",
        "|---|---|---|",
        f"| matching | {c['tp']} | {c['fn']} |",
        f"| mismatching | {c['fp']} | {c['tn']} |",
    ])


def summary(m: dict[str, Any]) -> dict[str, float]:
    """Just the five headline fractions (the matching.json record)."""
    return {k: float(m[k]) for k in METRIC_KEYS}
