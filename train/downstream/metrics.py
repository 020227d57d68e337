"""Metrics of the downstream protocols: ROC-AUC (binary, macro one-vs-rest, multi-label), average
precision, sensitivity/specificity at an operating point, and percentile-bootstrap confidence intervals.

AUC is the Mann-Whitney statistic computed from ranks (ties counted half), which makes the thousands of
bootstrap resamples cheap; tests hold it to scikit-learn's `roc_auc_score`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) along the last axis, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    sorted_x = x[order]
    # Boundaries of runs of equal values.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y_true, score) -> float:
    """Binary ROC-AUC; NaN when only one class is present."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def auc(y_true, scores, task: str) -> float:
    """AUC for a task: "binary" (scores [N] or [N,2]), "multiclass" (macro one-vs-rest over classes
    present), "multilabel" (macro over labels with both values present; NaN labels ignored)."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if task == "binary":
        return roc_auc(y.ravel(), s[:, -1] if s.ndim == 2 else s)
    if task == "multiclass":
        per = [roc_auc(y.ravel() == c, s[:, c]) for c in range(s.shape[1]) if 0 < (y.ravel() == c).sum() < y.size]
        return float(np.mean(per)) if per else float("nan")
    if task == "multilabel":
        per = []
        for j in range(s.shape[1]):
            known = np.isfinite(y[:, j])
            v = roc_auc(y[known, j], s[known, j]) if known.any() else float("nan")
            if np.isfinite(v):
                per.append(v)
        return float(np.mean(per)) if per else float("nan")
    raise ValueError(f"unknown task {task!r}: binary, multiclass or multilabel")


def average_precision(y_true, score) -> float:
    """Binary average precision (step-wise area under the precision-recall curve, as scikit-learn)."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each score value
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sensitivity_specificity(y_true, score, threshold: float) -> tuple[float, float]:
    y = np.asarray(y_true).astype(bool).ravel()
    pred = np.asarray(score, dtype=np.float64).ravel() >= threshold
    sens = float((pred & y).sum() / max(y.sum(), 1))
    spec = float((~pred & ~y).sum() / max((~y).sum(), 1))
    return sens, spec


def threshold_for_sensitivity(y_true, score, target: float = 0.9) -> float:
    """Largest threshold whose sensitivity reaches `target` (the operating point chosen on validation)."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.sort(np.asarray(score, dtype=np.float64).ravel()[y])[::-1]
    if s.size == 0:
        raise ValueError("no positive example to choose an operating point from")
    k = int(np.ceil(target * s.size)) - 1
    return float(s[min(max(k, 0), s.size - 1)])


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float], y_true, scores, n_boot: int = 1000,
    alpha: float = 0.05, seed: int = 0,
) -> Interval:
    """Percentile bootstrap over test cases; resamples where the metric is undefined are dropped."""
    y = np.asarray(y_true)
    s = np.asarray(scores)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        v = metric(y[i], s[i])
        if np.isfinite(v):
            values.append(v)
    if not values:
        raise ValueError("the metric is undefined on every bootstrap resample (one class only?)")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return Interval(float(metric(y, s)), float(low), float(high))
