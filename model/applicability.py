"""Input-applicability gate: images unlike frontal chest radiographs get no answer.

Header rules (Body Part Examined, View Position) are often wrong or absent, so the gate
looks at the image, with two Gaussian models fitted on frontal chest radiographs (the
training split and, optionally, frontal radiographs of other patients, e.g. adults):

- **features**: the classifier's pooled penultimate features (timm
  ``forward_head(pre_logits=True)``): catches textures the network never saw (noise,
  photos, MR, ultrasound, scrambled pixels);
- **layout**: the model input averaged over an 8 x 8 grid: catches images whose coarse
  anatomy is not that of a frontal chest (lateral views, limbs, hips, CT slices, animals).

Each distance is a Mahalanobis distance (covariance shrunk towards its diagonal) divided by
its threshold, the largest distance among held-out calibration chest radiographs (times a
margin): ratios above 1 are not applicable. A third rule catches frontal chest radiographs
served upside down or with inverted grey scale (a wrong Photometric Interpretation): when
its features are those of a chest radiograph and the flipped or negated layout fits the
chest model far better than the image's own, the image is refused with that reason.
Measurements: ``docs/models/applicability.md``.
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
from torch.nn import functional

logger = logging.getLogger(__name__)

GATE_FILE = "applicability.safetensors"
METHOD = (
    "two Mahalanobis distances to frontal chest radiographs: pooled penultimate features "
    "of the classifier, and the 8x8 layout of the model input; plus an orientation check "
    "(flipped / grey-scale-inverted layout fits far better)"
)
LAYOUT_GRID = 8
LAYOUT_DIM = LAYOUT_GRID * LAYOUT_GRID
DEFAULT_SHRINKAGE = 0.1
DEFAULT_MARGIN = 0.01  # float rounding and batch composition move distances by ~1e-6
DEFAULT_ORIENTATION_SLACK = 0.9

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GaussianScore:
    """A Gaussian model of frontal chest radiographs in one feature space.

    Attributes
    ----------
    mean
        (D,) mean of the fit set.
    precision
        (D, D) inverse of the shrunk covariance.
    threshold
        Largest RMS Mahalanobis distance still applicable.
    """

    mean: FloatArray
    precision: FloatArray
    threshold: float

    def distances(self, x: npt.NDArray[Any]) -> FloatArray:
        """Return the RMS Mahalanobis distance of each row of ``x`` (N, D)."""
        centred = np.asarray(x, dtype=np.float64) - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        out: FloatArray = np.sqrt(np.maximum(squared, 0.0) / self.mean.size)
        return out

    def ratios(self, x: npt.NDArray[Any]) -> FloatArray:
        """Return distance / threshold per row (> 1: not applicable; NaN maps to inf)."""
        out: FloatArray = np.nan_to_num(self.distances(x) / self.threshold, nan=np.inf)
        return out


def fit_gaussian(
    fit_rows: npt.NDArray[Any],
    calibration_rows: npt.NDArray[Any],
    shrinkage: float = DEFAULT_SHRINKAGE,
    margin: float = DEFAULT_MARGIN,
) -> GaussianScore:
    """Fit mean and shrunk covariance; threshold = max calibration distance x (1 + margin).

    Parameters
    ----------
    fit_rows
        (N, D) rows the Gaussian is fitted on.
    calibration_rows
        (M, D) held-out rows of the same kind (not in ``fit_rows``) setting the threshold.
    shrinkage
        Weight of the diagonal in ``(1 - s) * cov + s * diag(cov)`` (plus a small ridge).
    margin
        Relative margin above the largest calibration distance.
    """
    train = np.asarray(fit_rows, dtype=np.float64)
    if train.ndim != 2 or train.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) rows to fit the gate, got {train.shape}")
    if len(calibration_rows) == 0:
        raise ValueError("need calibration rows to set the gate's threshold")
    mean = train.mean(axis=0)
    cov = np.cov(train, rowvar=False)
    shrunk = (1.0 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov))
    shrunk += 1e-6 * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
    precision: FloatArray = np.asarray(np.linalg.inv(shrunk), dtype=np.float64)
    provisional = GaussianScore(mean, precision, 1.0)
    threshold = float(provisional.distances(calibration_rows).max()) * (1.0 + margin)
    return GaussianScore(mean, precision, threshold)


def _alternatives(layout_rows: FloatArray) -> dict[str, FloatArray]:
    """Layouts of the image upside down, grey-scale inverted, and both (input is centred)."""
    grid = layout_rows.reshape(len(layout_rows), LAYOUT_GRID, LAYOUT_GRID)
    flipped = grid[:, ::-1].reshape(len(layout_rows), -1)
    return {
        "upside down": flipped,
        "with inverted grey scale": -layout_rows,
        "upside down and with inverted grey scale": -flipped,
    }


@dataclass(frozen=True)
class ApplicabilityGate:
    """Feature and layout models of frontal chest radiographs, and the orientation rule.

    Attributes
    ----------
    features
        Model of the pooled penultimate features.
    layout
        Model of the 8 x 8 layout of the model input.
    orientation_slack
        An image whose flipped / inverted layout ratio is below ``orientation_slack`` times
        its own layout ratio (and itself applicable) is refused as mis-oriented.
    """

    features: GaussianScore
    layout: GaussianScore
    orientation_slack: float = 0.0

    threshold = 1.0

    @property
    def feature_dim(self) -> int:
        """Length of the network feature part of a gate feature row."""
        return int(self.features.mean.size)

    def _split(self, rows: npt.NDArray[Any]) -> tuple[FloatArray, FloatArray]:
        arr = np.asarray(rows, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.feature_dim + LAYOUT_DIM:
            raise ValueError(
                f"gate rows must be (N, {self.feature_dim + LAYOUT_DIM}), got {arr.shape}"
            )
        return arr[:, : self.feature_dim], arr[:, self.feature_dim :]

    def scores(self, rows: npt.NDArray[Any]) -> dict[str, FloatArray]:
        """Return the ratios ``features``, ``layout`` and ``orientation`` per row (> 1 refuses).

        Parameters
        ----------
        rows
            Outputs of :func:`logits_and_features` (features then layout).
        """
        feats, layout = self._split(rows)
        own = self.layout.ratios(layout)
        features = self.features.ratios(feats)
        best = np.min([self.layout.ratios(v) for v in _alternatives(layout).values()], axis=0)
        chest_like = (best <= 1.0) & (features <= 1.0)
        better = np.where(chest_like, self.orientation_slack * own / np.maximum(best, 1e-9), 0.0)
        return {"features": features, "layout": own, "orientation": better}

    def distances(self, rows: npt.NDArray[Any]) -> FloatArray:
        """Return the largest of the three ratios per row (> :attr:`threshold` refuses)."""
        out: FloatArray = np.max(np.stack(list(self.scores(rows).values())), axis=0)
        return out

    def reason(self, distance: float) -> str | None:
        """Return a generic reason for a score from :meth:`distances`, or None if applicable.

        :meth:`assess` gives the specific reason (what the daemon audits).
        """
        if np.isfinite(distance) and distance <= self.threshold:
            return None
        return f"image is not like a frontal chest radiograph (gate score {distance:.2f} > 1)"

    def assess(self, rows: npt.NDArray[Any]) -> list[str | None]:
        """Return, per row, why the image is not applicable, or None if it is.

        Parameters
        ----------
        rows
            Outputs of :func:`logits_and_features` (features then layout).
        """
        scores = self.scores(rows)
        _, layout = self._split(rows)
        names = list(_alternatives(layout))
        ratios = np.stack([self.layout.ratios(v) for v in _alternatives(layout).values()])
        closest = [names[int(k)] for k in np.argmin(ratios, axis=0)]
        return [
            _reason_one({k: float(v[i]) for k, v in scores.items()}, closest[i])
            for i in range(len(layout))
        ]


def _reason_one(score: dict[str, float], closest: str) -> str | None:
    """Reason for one image from its ratios; ``closest`` names the best-fitting alternative."""
    if score["orientation"] > 1.0:
        return (
            f"image looks like a frontal chest radiograph {closest} (check Photometric "
            "Interpretation and orientation): the model reads upright radiographs, bone bright"
        )
    if score["layout"] > 1.0:
        return (
            "image is not a frontal chest radiograph: its layout is unlike one (layout "
            f"distance ratio {score['layout']:.2f} > 1; lateral view, other body part or "
            "modality?)"
        )
    if not score["features"] <= 1.0:
        return (
            "image is unlike the frontal chest radiographs this model was trained on "
            f"(feature distance ratio {score['features']:.2f} > 1)"
        )
    return None


def layout_rows(inputs: torch.Tensor) -> torch.Tensor:
    """Return the 8 x 8 grid means of the channel-averaged model inputs (N, 64).

    Parameters
    ----------
    inputs
        (N, C, S, S) standardised model inputs.
    """
    grey = inputs.float().mean(dim=1, keepdim=True)
    return functional.adaptive_avg_pool2d(grey, LAYOUT_GRID).flatten(1)


def fit_gate(
    fit_rows: npt.NDArray[Any],
    calibration_rows: npt.NDArray[Any],
    shrinkage: float = DEFAULT_SHRINKAGE,
    margin: float = DEFAULT_MARGIN,
    orientation_slack: float = DEFAULT_ORIENTATION_SLACK,
) -> ApplicabilityGate:
    """Fit both models on ``fit_rows``; thresholds and orientation rule on calibration rows.

    The orientation slack is ``orientation_slack`` times the smallest ratio
    (alternative / own layout ratio) among the calibration rows, so no calibration image
    is refused as mis-oriented.

    Parameters
    ----------
    fit_rows
        (N, D + 64) :func:`logits_and_features` rows of frontal chest radiographs.
    calibration_rows
        Rows of other (held-out) frontal chest radiographs.
    shrinkage
        Covariance shrinkage towards the diagonal.
    margin
        Relative margin above the largest calibration distance.
    orientation_slack
        Safety factor of the orientation rule (< 1 refuses fewer images).
    """
    fit_arr = np.asarray(fit_rows, dtype=np.float64)
    cal = np.asarray(calibration_rows, dtype=np.float64)
    d = fit_arr.shape[1] - LAYOUT_DIM
    if d < 1:
        raise ValueError(f"gate rows need network features and a layout, got {fit_arr.shape}")
    features = fit_gaussian(fit_arr[:, :d], cal[:, :d], shrinkage, margin)
    layout = fit_gaussian(fit_arr[:, d:], cal[:, d:], shrinkage, margin)
    own = layout.ratios(cal[:, d:])
    best = np.min([layout.ratios(v) for v in _alternatives(cal[:, d:]).values()], axis=0)
    slack = float(orientation_slack * np.min(best / np.maximum(own, 1e-9)))
    return ApplicabilityGate(features, layout, slack)


def save_gate(path: Path, gate: ApplicabilityGate) -> None:
    """Write the gate's arrays to ``path`` (safetensors).

    Parameters
    ----------
    path
        Target file.
    gate
        The gate.
    """
    arrays: dict[str, npt.NDArray[Any]] = {
        "orientation_slack": np.array([gate.orientation_slack], dtype=np.float64)
    }
    for name, part in (("features", gate.features), ("layout", gate.layout)):
        arrays[f"{name}.mean"] = part.mean.astype(np.float64)
        arrays[f"{name}.precision"] = part.precision.astype(np.float64)
        arrays[f"{name}.threshold"] = np.array([part.threshold], dtype=np.float64)
    save_file(arrays, str(path))


def load_gate(path: Path) -> ApplicabilityGate:
    """Read a gate written by :func:`save_gate`.

    Parameters
    ----------
    path
        The safetensors file.

    Raises
    ------
    KeyError
        When the file lacks an array (e.g. a gate file of an older format).
    """
    arrays = load_file(str(path))

    def part(name: str) -> GaussianScore:
        return GaussianScore(
            mean=arrays[f"{name}.mean"].astype(np.float64),
            precision=arrays[f"{name}.precision"].astype(np.float64),
            threshold=float(arrays[f"{name}.threshold"][0]),
        )

    return ApplicabilityGate(
        part("features"), part("layout"), float(arrays["orientation_slack"][0])
    )


def logits_and_features(
    net: torch.nn.Module, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the logits (N,) and the gate's rows (N, D + 64) in one forward pass.

    A gate row is the pooled penultimate features of the network followed by
    :func:`layout_rows` of the input.

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
    return logits.reshape(-1), gate_rows(pooled, batch)


def gate_rows(pooled: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Return the gate's rows (N, D + 64): pooled features, then :func:`layout_rows` of ``batch``.

    Parameters
    ----------
    pooled
        (N, D) pooled penultimate features of the network for ``batch``.
    batch
        (N, C, S, S) model inputs.
    """
    return torch.cat([pooled.reshape(pooled.shape[0], -1).float(), layout_rows(batch)], dim=1)
