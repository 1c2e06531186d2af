"""Probability calibration of a bundle and its expected calibration error.

Temperature scaling (Guo et al. 2017) with a bias, i.e. Platt scaling:
``p = sigmoid(logit / T + b)``. A bias is needed because the class-balanced training loss
(BCE ``pos_weight``) shifts every logit; a temperature alone only rescales them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

FloatArray = npt.NDArray[np.float64]
ECE_BINS = 15


def to_logits(probs: npt.NDArray[Any], temperature: float = 1.0, bias: float = 0.0) -> FloatArray:
    """Return the raw logits behind probabilities made with ``temperature`` and ``bias``.

    Parameters
    ----------
    probs
        ``sigmoid(logit / temperature + bias)`` values.
    temperature, bias
        The calibration they were made with.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    out: FloatArray = (np.log(p / (1.0 - p)) - bias) * temperature
    return out


def expected_calibration_error(
    labels: npt.NDArray[np.bool_], probs: npt.NDArray[Any], bins: int = ECE_BINS
) -> float:
    """Return the ECE of P(positive): bin-weighted |mean probability - positive rate|.

    Parameters
    ----------
    labels
        True for positives.
    probs
        Predicted P(positive).
    bins
        Equal-width bins on [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += float(mask.mean()) * abs(float(p[mask].mean()) - float(y[mask].mean()))
    return total


def fit_temperature(
    labels: npt.NDArray[np.bool_], logits: npt.NDArray[Any], with_bias: bool = True
) -> tuple[float, float]:
    """Return (T, b) minimising the binary cross-entropy of ``sigmoid(logit / T + b)``.

    Parameters
    ----------
    labels
        True for positives (validation images).
    logits
        Raw logits.
    with_bias
        Fit the bias too (Platt scaling); else b = 0 (pure temperature scaling).
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=with_bias)
    params = [log_t, bias] if with_bias else [log_t]
    opt = torch.optim.LBFGS(params, lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp() + bias, y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return float(log_t.detach().exp()), float(bias.detach())


def move_threshold(threshold: float, old: tuple[float, float], new: tuple[float, float]) -> float:
    """Return the threshold giving the same decisions under a new calibration.

    Parameters
    ----------
    threshold
        Threshold on probabilities made with calibration ``old``.
    old, new
        (temperature, bias) pairs.
    """
    logit = float(to_logits(np.array([threshold]), *old)[0])
    return 1.0 / (1.0 + math.exp(-(logit / new[0] + new[1])))


def calibration_report(
    labels: npt.NDArray[np.bool_], logits: npt.NDArray[Any], temperature: float, bias: float
) -> dict[str, Any]:
    """Return ECE and NLL before (T = 1, b = 0) and after calibration.

    Parameters
    ----------
    labels
        True for positives.
    logits
        Raw logits.
    temperature, bias
        Fitted calibration.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)

    def probs(t: float, b: float) -> FloatArray:
        out: FloatArray = 1.0 / (1.0 + np.exp(-(z / t + b)))
        return out

    def nll(p: FloatArray) -> float:
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))

    before, after = probs(1.0, 0.0), probs(temperature, bias)
    return {
        "method": "temperature scaling with a bias (Platt): p = sigmoid(logit / T + b), "
        "LBFGS on the validation BCE",
        "temperature": temperature,
        "logit_bias": bias,
        "n": int(len(y)),
        "ece_bins": ECE_BINS,
        "ece_before": expected_calibration_error(y, before),
        "ece_after": expected_calibration_error(y, after),
        "nll_before": nll(before),
        "nll_after": nll(after),
    }
