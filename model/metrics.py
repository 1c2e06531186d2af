"""Binary classification metrics, threshold selection and bootstrap intervals."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


def roc_auc(labels: Array, scores: Array) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN if one class.

    Parameters
    ----------
    labels
        1 for positive, 0 for negative.
    scores
        Higher means more positive.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else float("nan")


def binary_metrics(labels: Array, scores: Array, threshold: float) -> dict[str, Any]:
    """Metrics at a threshold: accuracy, sensitivity, specificity, PPV, NPV, F1, AUC.

    Parameters
    ----------
    labels
        1 for positive, 0 for negative.
    scores
        Probabilities of the positive class.
    threshold
        Decision threshold (positive when ``score >= threshold``).
    """
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    sens = _ratio(tp, tp + fn)
    ppv = _ratio(tp, tp + fp)
    return {
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(y, scores),
        "confusion_matrix": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def choose_threshold(labels: Array, scores: Array, target_sensitivity: float = 0.95) -> float:
    """Highest threshold reaching ``target_sensitivity``, else the Youden-optimal one.

    Parameters
    ----------
    labels
        1 for positive, 0 for negative.
    scores
        Probabilities of the positive class.
    target_sensitivity
        Wanted sensitivity; ``<= 0`` selects Youden's J directly.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.sum() == 0 or (~y).sum() == 0:
        return 0.5
    candidates = np.unique(s)[::-1]  # descending: sensitivity grows as threshold falls
    best_j, best_t = -np.inf, 0.5
    for t in candidates:
        pred = s >= t
        sens = (pred & y).sum() / y.sum()
        spec = (~pred & ~y).sum() / (~y).sum()
        if target_sensitivity > 0 and sens >= target_sensitivity:
            return float(t)
        if sens + spec - 1 > best_j:
            best_j, best_t = sens + spec - 1, float(t)
    return best_t


def bootstrap_ci(
    labels: Array,
    scores: Array,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    keys: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "auc"),
) -> dict[str, list[float]]:
    """Percentile bootstrap 95 % confidence intervals of selected metrics.

    Parameters
    ----------
    labels, scores, threshold
        As for :func:`binary_metrics`.
    n_resamples
        Bootstrap resamples (images resampled with replacement).
    seed
        Random seed.
    keys
        Metric names to report.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y), len(y))
        m = binary_metrics(y[idx], s[idx], threshold)
        for k in keys:
            if not np.isnan(m[k]):
                values[k].append(float(m[k]))
    return {
        k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
        if v
        else [float("nan"), float("nan")]
        for k, v in values.items()
    }
