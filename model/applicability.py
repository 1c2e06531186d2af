"""Input-applicability gate: images unlike the training radiographs get no answer.

Header rules (Body Part Examined, View Position) are often wrong or absent, so the gate
looks at the image: (1) through the network itself, the pooled penultimate features of
the classifier (timm ``forward_head(pre_logits=True)``) compared with their distribution
on the training split by a Mahalanobis distance (covariance shrunk towards its diagonal
so it stays invertible); (2) by an image statistic of the model input that the features
miss, the bright mediastinum between two dark lung fields of a frontal view
(:func:`mediastinum_contrast`; lateral views lack it). Each threshold is a quantile of the
validation images, so the false-rejection rate on the training source is bounded by
construction, and it is measured on the held-out test split. An image beyond either is
NOT_APPLICABLE with a reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.numpy import load_file, save_file

logger = logging.getLogger(__name__)

GATE_FILE = "applicability.safetensors"
METHOD = "mahalanobis distance of pooled penultimate features to the training split"
DEFAULT_QUANTILE = 0.995
DEFAULT_SHRINKAGE = 0.1

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ApplicabilityGate:
    """Mean and precision of the training features, and the distance threshold.

    Attributes
    ----------
    mean
        (D,) mean feature vector of the training split.
    precision
        (D, D) inverse of the shrunk covariance.
    threshold
        Largest distance still applicable (per-dimension root mean square units).
    contrast_threshold
        Smallest :func:`mediastinum_contrast` still applicable.
    """

    mean: FloatArray
    precision: FloatArray
    threshold: float
    contrast_threshold: float = float("-inf")

    def distances(self, features: npt.NDArray[Any]) -> FloatArray:
        """Return the RMS Mahalanobis distance of each row of ``features`` (N, D).

        Parameters
        ----------
        features
            Pooled penultimate features.
        """
        centred = np.asarray(features, dtype=np.float64) - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        out: FloatArray = np.sqrt(np.maximum(squared, 0.0) / self.mean.size)
        return out

    def reason(self, distance: float, contrast: float = float("inf")) -> str | None:
        """Return why an image is not applicable, or None if it is.

        Parameters
        ----------
        distance
            From :meth:`distances`.
        contrast
            From :func:`mediastinum_contrast`.
        """
        if not (np.isfinite(distance) and distance <= self.threshold):
            return (
                f"image is unlike the frontal chest radiographs this model was trained on "
                f"(feature distance {distance:.2f} > {self.threshold:.2f})"
            )
        if not contrast >= self.contrast_threshold:
            return (
                "image is not a frontal chest radiograph: no bright mediastinum between two "
                f"darker lung fields (contrast {contrast:.2f} < {self.contrast_threshold:.2f}; "
                "lateral view?)"
            )
        return None


def mediastinum_contrast(images: npt.NDArray[Any]) -> FloatArray:
    """Return how much brighter the middle columns are than both lung fields, per image.

    On the standardised model input (N, C, S, S), rows 25-75 %: mean of columns 41-59 %
    minus the mean of columns 12-38 % and 62-88 %. A frontal chest radiograph has the
    bright mediastinum between two dark lungs; a lateral view, an abdomen or a limb
    mostly does not.

    Parameters
    ----------
    images
        Model inputs (any normalisation; each image is standardised here).
    """
    x = np.asarray(images, dtype=np.float64).mean(axis=1)
    size = x.shape[-1]
    flat = x.reshape(len(x), -1)
    x = (x - flat.mean(axis=1)[:, None, None]) / (flat.std(axis=1)[:, None, None] + 1e-6)
    band = x[:, size // 4 : 3 * size // 4].mean(axis=1)

    def cols(lo: float, hi: float) -> FloatArray:
        out: FloatArray = band[:, round(lo * size) : round(hi * size)].mean(axis=1)
        return out

    result: FloatArray = cols(0.406, 0.594) - 0.5 * (cols(0.125, 0.375) + cols(0.625, 0.875))
    return result


def fit_gate(
    train_features: npt.NDArray[Any],
    val_features: npt.NDArray[Any],
    quantile: float = DEFAULT_QUANTILE,
    shrinkage: float = DEFAULT_SHRINKAGE,
    val_contrasts: npt.NDArray[Any] | None = None,
) -> ApplicabilityGate:
    """Fit mean and shrunk covariance on training features; thresholds on validation.

    Parameters
    ----------
    train_features
        (N, D) features of the training split.
    val_features
        (M, D) features of the validation split.
    quantile
        Quantile of the validation distances used as threshold (0.995: about 0.5 %
        false rejections on the validation images).
    shrinkage
        Weight of the diagonal in ``(1 - s) * cov + s * diag(cov)`` (plus a small ridge).
    val_contrasts
        :func:`mediastinum_contrast` of the validation images; its ``1 - quantile``
        quantile becomes the contrast threshold (none without).
    """
    train = np.asarray(train_features, dtype=np.float64)
    if train.ndim != 2 or train.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) training features, got {train.shape}")
    mean = train.mean(axis=0)
    cov = np.cov(train, rowvar=False)
    diag = np.diag(np.diag(cov))
    shrunk = (1.0 - shrinkage) * cov + shrinkage * diag
    shrunk += 1e-6 * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
    precision: FloatArray = np.asarray(np.linalg.inv(shrunk), dtype=np.float64)
    provisional = ApplicabilityGate(mean, precision, float("inf"))
    threshold = float(np.quantile(provisional.distances(val_features), quantile))
    contrast = (
        float(np.quantile(np.asarray(val_contrasts, dtype=np.float64), 1.0 - quantile))
        if val_contrasts is not None
        else float("-inf")
    )
    return ApplicabilityGate(mean, provisional.precision, threshold, contrast)


def save_gate(path: Path, gate: ApplicabilityGate) -> None:
    """Write the gate's arrays to ``path`` (safetensors).

    Parameters
    ----------
    path
        Target file.
    gate
        The gate.
    """
    save_file(
        {
            "mean": gate.mean.astype(np.float32),
            "precision": gate.precision.astype(np.float32),
            "threshold": np.array([gate.threshold], dtype=np.float64),
            "contrast_threshold": np.array([gate.contrast_threshold], dtype=np.float64),
        },
        str(path),
    )


def load_gate(path: Path) -> ApplicabilityGate:
    """Read a gate written by :func:`save_gate`.

    Parameters
    ----------
    path
        The safetensors file.
    """
    arrays = load_file(str(path))
    return ApplicabilityGate(
        mean=arrays["mean"].astype(np.float64),
        precision=arrays["precision"].astype(np.float64),
        threshold=float(arrays["threshold"][0]),
        contrast_threshold=float(arrays["contrast_threshold"][0])
        if "contrast_threshold" in arrays
        else float("-inf"),
    )


def logits_and_features(
    net: torch.nn.Module, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the logits (N,) and pooled penultimate features (N, D) in one forward pass.

    Parameters
    ----------
    net
        A timm network with one output (``forward_features`` / ``forward_head``).
    batch
        (N, C, S, S) model inputs.
    """
    forward_features = getattr(net, "forward_features", None)
    forward_head = getattr(net, "forward_head", None)
    if forward_features is None or forward_head is None:
        raise ValueError(f"{type(net).__name__} does not expose timm forward_features/head")
    pooled = forward_head(forward_features(batch), pre_logits=True)
    logits = net.get_classifier()(pooled)  # type: ignore[operator]
    return logits.reshape(-1), pooled.reshape(pooled.shape[0], -1)
