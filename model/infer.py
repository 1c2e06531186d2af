"""Warm, batched inference with a loaded bundle (CPU or CUDA).

Inputs reach the device through one :class:`StagingBuffer` per classifier: a host tensor of
one batch, allocated once (pinned on CUDA) and reused, copied with ``non_blocking``; the
forward pass runs under ``torch.autocast`` on CUDA. The daemon preprocesses on its prepare
stage and calls :meth:`Classifier.classify_prepared` / :meth:`Classifier.heatmaps_prepared`
from its micro-batchers (:mod:`model.batcher`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from model.applicability import gate_rows, logits_and_features
from model.bundle import Aggregation, Bundle
from model.explain import Explanation, cam_to_source, grad_cam, head_cams
from model.pixels import PixelMeta
from model.preprocess import CropBox, crop_box, preprocess

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
    cam
        Raw Grad-CAM map (h, w) of the last stage, computed in the same forward pass
        (:meth:`Classifier.classify_with_cams`), else None.
    """

    probability: float
    positive: bool
    not_applicable: str | None = None
    cam: npt.NDArray[np.float32] | None = field(default=None, compare=False, repr=False)


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


class StagingBuffer:
    """One batch of model inputs on the host, allocated once and reused for every batch.

    On CUDA the buffer is pinned (page-locked) and copied to the device with
    ``non_blocking=True``; before it is refilled the previous copy is awaited (a CUDA event),
    so a batch never sees the next one's data. On CPU (``pin`` off) the device tensor is a
    view of the buffer, used before the next fill (callers hold the classifier's lock).

    Parameters
    ----------
    shape
        (max_batch, C, S, S) of one full batch.
    device
        Where the batches go.
    pin
        Pin the host buffer (default: when ``device`` is CUDA).
    """

    def __init__(
        self, shape: tuple[int, int, int, int], device: torch.device, pin: bool | None = None
    ) -> None:
        self.device = device
        self.pinned = device.type == "cuda" if pin is None else pin
        self.host = torch.empty(shape, dtype=torch.float32, pin_memory=self.pinned)
        self._copied: Any = None  # torch.cuda.Event of the last host -> device copy
        self.fills = 0

    def load(self, arrays: Sequence[npt.NDArray[Any]]) -> torch.Tensor:
        """Copy ``arrays`` (each (C, S, S)) into the buffer; return them as a device batch.

        Raises
        ------
        ValueError
            When an array does not have the buffer's item shape or there are too many.
        """
        expected = tuple(self.host.shape[1:])
        if len(arrays) > self.host.shape[0]:
            raise ValueError(f"{len(arrays)} inputs exceed the batch of {self.host.shape[0]}")
        for arr in arrays:
            if tuple(arr.shape) != expected:
                raise ValueError(
                    f"preprocessed image has shape {tuple(arr.shape)}, expected {expected}"
                )
        if self._copied is not None:
            self._copied.synchronize()
        for k, arr in enumerate(arrays):
            self.host[k].copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
        self.fills += 1
        batch = self.host[: len(arrays)]
        if self.device.type != "cuda":
            return batch.to(self.device)
        on_device = batch.to(self.device, non_blocking=self.pinned)
        self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._copied.record()
        return on_device


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
        size = self.spec.input_size
        self.staging = StagingBuffer((batch_size, self.spec.channels, size, size), self.device)
        self._lock = threading.Lock()
        """One batch at a time on the device and in the staging buffer (several threads)."""

    def _batch_tensor(self, batch: Sequence[npt.NDArray[Any]]) -> torch.Tensor:
        return self.staging.load(batch)

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
        self, images: Sequence[npt.NDArray[Any]], with_gate: bool, with_cams: bool = False
    ) -> tuple[npt.NDArray[np.float64], list[str | None], list[npt.NDArray[np.float32] | None]]:
        """Return probabilities, with the gate why each image is refused, and Grad-CAMs.

        One forward pass per batch; ``with_cams`` adds one backward through the head.
        """
        out = np.empty(len(images), dtype=np.float64)
        reasons: list[str | None] = []
        cams: list[npt.NDArray[np.float32] | None] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            with self._lock:
                batch = self._batch_tensor(chunk)
                if with_cams:
                    logits, rows, maps = self._run_with_cams(batch, with_gate)
                else:
                    logits, rows = self._run(batch, with_gate)
                    maps = [None] * len(chunk)
            probs = torch.sigmoid(logits.float().reshape(-1) / self.temperature + self.logit_bias)
            out[start : start + len(chunk)] = probs.cpu().numpy().astype(np.float64)
            reasons.extend([None] * len(chunk) if rows is None else self._assess(rows))
            cams.extend(maps)
        return out, reasons, cams

    def _run(
        self, batch: torch.Tensor, with_gate: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and (with the gate) gate rows of one batch, without autograd."""
        use_cuda = self.device.type == "cuda"
        with (
            torch.inference_mode(),
            torch.autocast(device_type=self.device.type, enabled=use_cuda),
        ):
            if with_gate and self.gate is not None:
                logits, rows = logits_and_features(self._net, batch)
                return logits.detach(), rows.detach()
            return self._net(batch).detach(), None

    def _run_with_cams(
        self, batch: torch.Tensor, with_gate: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[npt.NDArray[np.float32] | None]]:
        """As :meth:`_run`, plus each image's Grad-CAM (:func:`model.explain.head_cams`)."""
        use_cuda = self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=use_cuda):
            features = self._net.forward_features(batch)  # type: ignore[operator]
            logits, pooled, cams = head_cams(self._net, features)
            rows = gate_rows(pooled, batch) if with_gate and self.gate is not None else None
        maps = cams.cpu().numpy().astype(np.float32)
        return logits, rows, list(maps)

    def _assess(self, rows: torch.Tensor) -> list[str | None]:
        """Return the gate's verdict per row (None: applicable)."""
        assert self.gate is not None  # rows exist only with a gate
        return self.gate.assess(rows.float().cpu().numpy())

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
                with self._lock:
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
        return self.classify_prepared([preprocess(p, m, self.spec) for p, m in items])

    def classify_prepared(self, tensors: Sequence[npt.NDArray[Any]]) -> list[ImagePrediction]:
        """Classify preprocessed (C, S, S) arrays; with a gate, say which are not applicable.

        The daemon's micro-batcher calls this with inputs of several studies at once.
        """
        return self._predictions(tensors, with_cams=False)

    def classify_with_cams(self, tensors: Sequence[npt.NDArray[Any]]) -> list[ImagePrediction]:
        """As :meth:`classify_prepared`, each prediction with its raw Grad-CAM map.

        One forward pass (probabilities and gate as :meth:`classify_prepared`, identical)
        and one backward through the head: the maps equal those of
        :meth:`heatmaps_prepared` within float tolerance, without its second forward.
        """
        return self._predictions(tensors, with_cams=True)

    def _predictions(
        self, tensors: Sequence[npt.NDArray[Any]], with_cams: bool
    ) -> list[ImagePrediction]:
        probs, reasons, cams = self._forward(tensors, with_gate=True, with_cams=with_cams)
        return [
            ImagePrediction(float(p), bool(p >= self.threshold), why, cam)
            for p, why, cam in zip(probs, reasons, cams, strict=True)
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
        raw = self.heatmaps_prepared(tensors)
        return [
            Explanation(probability=prob, heatmap=self.heatmap_on_source(cam, shapes[i], boxes[i]))
            for i, (prob, cam) in enumerate(raw)
        ]

    def heatmaps_prepared(
        self, tensors: Sequence[npt.NDArray[Any]]
    ) -> list[tuple[float, npt.NDArray[np.float32]]]:
        """Return (probability, raw Grad-CAM map) of preprocessed arrays: one backward a batch.

        Map a raw map onto its source image with :meth:`heatmap_on_source`.
        """
        use_cuda = self.device.type == "cuda"
        out: list[tuple[float, npt.NDArray[np.float32]]] = []
        for start in range(0, len(tensors), self.batch_size):
            with self._lock:
                batch = self._batch_tensor(tensors[start : start + self.batch_size])
                probs, cams = grad_cam(
                    self._net,
                    batch,
                    autocast=use_cuda,
                    temperature=self.temperature,
                    logit_bias=self.logit_bias,
                )
            out.extend((float(p), cam) for p, cam in zip(probs, cams, strict=True))
        return out

    def heatmap_on_source(
        self, cam: npt.NDArray[np.float32], shape: tuple[int, int], box: CropBox | None
    ) -> npt.NDArray[np.float32]:
        """Map a raw Grad-CAM map onto the (H, W) grid of its source image (crop ``box``)."""
        return cam_to_source(cam, shape, self.spec, box)
