"""Agreement between estimated and retrained stage effects (kept apart from the estimators)."""

from __future__ import annotations

import math

import numpy as np


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (no variation to correlate)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(a), _ranks(b))


def sign_agreement(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of values whose estimated effect has the sign of the retrained one."""
    estimate, truth = np.asarray(estimate), np.asarray(truth)
    return float(np.mean(np.sign(estimate) == np.sign(truth)))


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """‖estimate − truth‖ / ‖truth‖ over the N values."""
    denom = float(np.linalg.norm(truth))
    return float(np.linalg.norm(np.asarray(estimate) - np.asarray(truth)) / denom) if denom > 0 else float("nan")
