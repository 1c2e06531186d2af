"""Temperature scaling (Guo et al. 2017) and expected calibration error for a bundle."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

FloatArray = npt.NDArray[np.float64]
ECE_BINS = 15


def to_logits(probs: npt.NDArray[Any], temperature: float = 1.0) -> FloatArray:
    """Return the raw logits behind probabilities made with ``temperature``.

    Parameters
    ----------
    probs
        ``sigmoid(logit / temperature)`` values.
    temperature
        The temperature they were made with.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    out: FloatArray = np.log(p / (1.0 - p)) * temperature
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


def fit_temperature(labels: npt.NDArray[np.bool_], logits: npt.NDArray[Any]) -> float:
    """Return the temperature minimising the binary cross-entropy of ``sigmoid(logit / T)``.

    Parameters
    ----------
    labels
        True for positives (validation images).
    logits
        Raw logits (temperature 1).
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return float(log_t.detach().exp())


def move_threshold(threshold: float, old_temperature: float, new_temperature: float) -> float:
    """Return the threshold giving the same decisions under a new temperature.

    Parameters
    ----------
    threshold
        Threshold on probabilities made with ``old_temperature``.
    old_temperature, new_temperature
        Temperatures.
    """
    logit = float(to_logits(np.array([threshold]), old_temperature)[0])
    return 1.0 / (1.0 + math.exp(-logit / new_temperature))


def calibration_report(
    labels: npt.NDArray[np.bool_], logits: npt.NDArray[Any], temperature: float
) -> dict[str, Any]:
    """Return ECE and NLL before (T = 1) and after temperature scaling.

    Parameters
    ----------
    labels
        True for positives.
    logits
        Raw logits.
    temperature
        Fitted temperature.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)

    def nll(t: float) -> float:
        p = np.clip(1.0 / (1.0 + np.exp(-z / t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))

    before, after = 1.0 / (1.0 + np.exp(-z)), 1.0 / (1.0 + np.exp(-z / temperature))
    return {
        "method": "temperature scaling (one scalar T, LBFGS on validation BCE)",
        "temperature": temperature,
        "n": int(len(y)),
        "ece_bins": ECE_BINS,
        "ece_before": expected_calibration_error(y, before),
        "ece_after": expected_calibration_error(y, after),
        "nll_before": nll(1.0),
        "nll_after": nll(temperature),
    }
