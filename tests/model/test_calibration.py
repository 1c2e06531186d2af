"""Temperature scaling: recovers a known temperature, lowers the ECE, keeps decisions."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    move_threshold,
    to_logits,
)


def _overconfident(
    n: int = 4000, true_t: float = 2.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), logits reported as z * true_t (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = rng.random(n) < 1.0 / (1.0 + np.exp(-z))
    return labels, z * true_t


def test_fit_temperature_recovers_the_scale_and_lowers_the_ece() -> None:
    labels, logits = _overconfident()
    t, b = fit_temperature(labels, logits)
    assert t == pytest.approx(2.5, rel=0.1) and b == pytest.approx(0.0, abs=0.1)
    report = calibration_report(labels, logits, t, b)
    assert report["ece_after"] < 0.5 * report["ece_before"]
    assert report["nll_after"] < report["nll_before"]


def test_calibrated_model_keeps_temperature_one() -> None:
    labels, logits = _overconfident(true_t=1.0, seed=1)
    assert fit_temperature(labels, logits)[0] == pytest.approx(1.0, abs=0.1)


def test_bias_corrects_a_shifted_model_that_temperature_alone_cannot() -> None:
    # class-weighted training shifts every logit (here by -1.5): a bias is needed
    labels, logits = _overconfident(true_t=1.0, seed=3)
    shifted = logits - 1.5
    t_only, b_zero = fit_temperature(labels, shifted, with_bias=False)
    t, b = fit_temperature(labels, shifted)
    assert b_zero == 0.0 and b == pytest.approx(1.5, abs=0.15) and t == pytest.approx(1.0, abs=0.1)
    ece_t = calibration_report(labels, shifted, t_only, 0.0)["ece_after"]
    ece_tb = calibration_report(labels, shifted, t, b)["ece_after"]
    assert ece_tb < 0.5 * ece_t


def test_move_threshold_keeps_every_decision() -> None:
    labels, logits = _overconfident(seed=2)
    old, new, threshold = (1.0, 0.0), (2.5, 0.7), 0.8
    before = 1.0 / (1.0 + np.exp(-(logits / old[0] + old[1]))) >= threshold
    moved = move_threshold(threshold, old, new)
    after = 1.0 / (1.0 + np.exp(-(logits / new[0] + new[1]))) >= moved
    assert (before == after).all()


def test_to_logits_inverts_the_calibrated_sigmoid() -> None:
    z = np.array([-3.0, -0.5, 0.0, 2.0])
    probs = 1.0 / (1.0 + np.exp(-(z / 2.0 + 0.3)))
    np.testing.assert_allclose(to_logits(probs, 2.0, 0.3), z, atol=1e-9)


def test_ece_of_perfect_and_of_wrong_probabilities() -> None:
    labels = np.array([True, False] * 50)
    assert expected_calibration_error(labels, labels.astype(float)) == 0.0
    assert expected_calibration_error(labels, 1.0 - labels.astype(float)) == 1.0
