"""Warm, batched inference with a loaded bundle (CPU or CUDA)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from model.applicability import logits_and_features, mediastinum_contrast
from model.bundle import Aggregation, Bundle
from model.explain import Explanation, cam_to_source, grad_cam
from model.pixels import PixelMeta
from model.preprocess import crop_box, preprocess

logger = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """Choose the inference device.

    Parameters
    ----------
    preference
        ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises
    ------
    ValueError
        When CUDA is requested but not available, or the preference is unknown.
    """
    pref = preference.strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        return torch.device(pref)
    raise ValueError(f"unknown device preference {preference!r} (auto, cpu, cuda, cuda:N)")


@dataclass(frozen=True)
class ImagePrediction:
    """Result for one image.

    Attributes
    ----------
    probability
        Calibrated P(positive class) (``sigmoid(logit / temperature + logit_bias)``).
    positive
        ``probability >= threshold``.
    not_applicable
        Why the applicability gate rejects the image, or None (also without a gate).
    """

    probability: float
    positive: bool
    not_applicable: str | None = None


def aggregate_study(
    probabilities: Sequence[float], aggregation: Aggregation | None = None
) -> float:
    """Study-level probability from per-image probabilities, as the card says.

    Parameters
    ----------
    probabilities
        Per-image (or per-slice) probabilities.
    aggregation
        The card's :class:`model.bundle.Aggregation`; default ``max``.

    Raises
    ------
    ValueError
        For an empty sequence (a study without images has no result).
    """
    if len(probabilities) == 0:
        raise ValueError("cannot aggregate a study without image probabilities")
    rule = aggregation if aggregation is not None else Aggregation()
    values = np.asarray(probabilities, dtype=np.float64)
    if rule.method == "max":
        return float(values.max())
    if rule.method == "mean":
        return float(values.mean())
    assert rule.k is not None  # validated by Aggregation
    top = np.sort(values)[::-1][: rule.k]
    return float(top.mean())


class Classifier:
    """A warm classifier: network built once on the device and reused for every study.

    Parameters
    ----------
    bundle
        Loaded bundle.
    device
        Target device (default: :func:`select_device` ``("auto")``).
    batch_size
        Images per forward pass.
    """

    def __init__(
        self, bundle: Bundle, device: torch.device | None = None, batch_size: int = 16
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.device = device if device is not None else select_device("auto")
        self.batch_size = batch_size
        self.spec = bundle.card.preprocess_spec
        self.threshold = bundle.card.threshold
        self.temperature = bundle.card.temperature
        self.logit_bias = bundle.card.logit_bias
        self.gate = bundle.gate
        self._net = bundle.model.to(self.device).eval()
        self._expected_shape = (self.spec.channels, self.spec.input_size, self.spec.input_size)

    def _batch_tensor(self, batch: Sequence[npt.NDArray[Any]]) -> torch.Tensor:
        for arr in batch:
            if tuple(arr.shape) != self._expected_shape:
                raise ValueError(
                    f"preprocessed image has shape {tuple(arr.shape)}, "
                    f"expected {self._expected_shape}"
                )
        host = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in batch]))
        if self.device.type == "cuda":
            host = host.pin_memory()
            return host.to(self.device, non_blocking=True)
        return host.to(self.device)

    def predict(self, images: Sequence[npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
        """Return calibrated P(positive class) for preprocessed (C, H, W) arrays.

        Parameters
        ----------
        images
            Outputs of :func:`model.preprocess.preprocess` with this bundle's spec.

        Returns
        -------
        numpy.ndarray
            float64 array of shape (N,).
        """
        return self._forward(images, with_gate=False)[0]

    def _forward(
        self, images: Sequence[npt.NDArray[Any]], with_gate: bool
    ) -> tuple[npt.NDArray[np.float64], list[str | None]]:
        """Return probabilities and, with the gate, why each image is refused (one pass)."""
        out = np.empty(len(images), dtype=np.float64)
        gate = self.gate if with_gate else None
        reasons: list[str | None] = [None] * len(images)
        use_cuda = self.device.type == "cuda"
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = self._batch_tensor(images[start : start + self.batch_size])
                with torch.autocast(device_type=self.device.type, enabled=use_cuda):
                    if gate is not None:
                        logits, feats = logits_and_features(self._net, batch)
                    else:
                        logits = self._net(batch)
                probs = torch.sigmoid(
                    logits.float().reshape(-1) / self.temperature + self.logit_bias
                )
                out[start : start + len(probs)] = probs.cpu().numpy().astype(np.float64)
                if gate is not None:
                    dist = gate.distances(feats.float().cpu().numpy())
                    contrast = mediastinum_contrast(batch.float().cpu().numpy())
                    for k, (d, c) in enumerate(zip(dist, contrast, strict=True)):
                        reasons[start + k] = gate.reason(float(d), float(c))
        return out, reasons

    def features(self, images: Sequence[npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """Return pooled penultimate features (N, D) of preprocessed arrays (gate fitting).

        Parameters
        ----------
        images
            Outputs of :func:`model.preprocess.preprocess` with this bundle's spec.
        """
        chunks: list[npt.NDArray[np.float32]] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = self._batch_tensor(images[start : start + self.batch_size])
                chunks.append(logits_and_features(self._net, batch)[1].float().cpu().numpy())
        return np.concatenate(chunks) if chunks else np.empty((0, 0), dtype=np.float32)

    def classify(
        self, items: Sequence[tuple[npt.NDArray[Any], PixelMeta]]
    ) -> list[ImagePrediction]:
        """Preprocess and classify images; with a gate, say which are not applicable.

        Parameters
        ----------
        items
            (stored pixels, metadata) pairs as produced by the DICOM reader or
            :func:`model.preprocess.load_image_file`.
        """
        tensors = [preprocess(pixels, meta, self.spec) for pixels, meta in items]
        probs, reasons = self._forward(tensors, with_gate=True)
        return [
            ImagePrediction(float(p), bool(p >= self.threshold), why)
            for p, why in zip(probs, reasons, strict=True)
        ]

    def explain(self, items: Sequence[tuple[npt.NDArray[Any], PixelMeta]]) -> list[Explanation]:
        """Classify images and return a Grad-CAM heatmap with each probability.

        Same preprocessing, device, batching and (on CUDA) autocast as :meth:`classify`;
        the probabilities agree with it within 1e-5. Grad-CAM uses the last convolutional
        stage of the timm network (:func:`model.explain.grad_cam`); each heatmap is mapped
        back onto its source image's (H, W) grid.

        Parameters
        ----------
        items
            (stored pixels, metadata) pairs, as for :meth:`classify`.

        Returns
        -------
        list of Explanation
            One per item, in order.
        """
        shapes = [(int(np.shape(p)[0]), int(np.shape(p)[1])) for p, _ in items]
        boxes = [crop_box(pixels, self.spec) for pixels, _ in items]
        tensors = [preprocess(pixels, meta, self.spec) for pixels, meta in items]
        use_cuda = self.device.type == "cuda"
        out: list[Explanation] = []
        for start in range(0, len(tensors), self.batch_size):
            batch = self._batch_tensor(tensors[start : start + self.batch_size])
            probs, cams = grad_cam(
                self._net,
                batch,
                autocast=use_cuda,
                temperature=self.temperature,
                logit_bias=self.logit_bias,
            )
            for offset, (prob, cam) in enumerate(zip(probs, cams, strict=True)):
                i = start + offset
                heatmap = cam_to_source(cam, shapes[i], self.spec, boxes[i])
                out.append(Explanation(probability=float(prob), heatmap=heatmap))
        return out
