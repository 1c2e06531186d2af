from __future__ import annotations

import itertools

import numpy as np
import pytest

from model.metrics import binary_metrics, bootstrap_ci, choose_threshold, roc_auc


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60) + 0.3 * y, 1)  # rounding creates ties
    assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s))
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


def test_binary_metrics_confusion() -> None:
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    m = binary_metrics(y, s, 0.5)
    assert m["confusion_matrix"] == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


def test_choose_threshold_reaches_target_sensitivity_else_youden() -> None:
    rng = np.random.default_rng(1)
    y = np.array([1] * 50 + [0] * 50)
    s = np.concatenate([rng.normal(1, 1, 50), rng.normal(-1, 1, 50)])
    t = choose_threshold(y, s, 0.9)
    assert binary_metrics(y, s, t)["sensitivity"] >= 0.9
    # highest such threshold: the next higher score drops below the target
    higher = np.sort(s[s > t])
    if len(higher):
        assert binary_metrics(y, s, higher[0])["sensitivity"] < 0.9
    youden = choose_threshold(y, s, 0.0)
    j = binary_metrics(y, s, youden)
    best = max(
        binary_metrics(y, s, c)["sensitivity"] + binary_metrics(y, s, c)["specificity"]
        for c in np.unique(s)
    )
    assert j["sensitivity"] + j["specificity"] == pytest.approx(best)


def test_bootstrap_ci_contains_point_estimate() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + 0.5 * y
    ci = bootstrap_ci(y, s, 0.7, n_resamples=200)
    point = binary_metrics(y, s, 0.7)
    for key in ("accuracy", "auc"):
        assert ci[key][0] <= point[key] <= ci[key][1]
