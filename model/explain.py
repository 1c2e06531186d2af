"""Grad-CAM explanations: where in the image the network looked for the finding.

Grad-CAM (Selvaraju et al., ICCV 2017) weights the feature maps of the network's last
convolutional stage by the spatially averaged gradient of the positive-class logit and
keeps the positive part. radflag computes it with the timm feature API
(``forward_features`` -> ``forward_head``), which is the network's own ``forward``, so the
probability that comes with a heatmap is the one :meth:`model.infer.Classifier.classify`
reports. The heatmap is mapped back through the letterbox of
:func:`model.preprocess.preprocess` onto the source image's pixel grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from model.preprocess import CropBox, PreprocessSpec, input_placement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explanation:
    """Probability and Grad-CAM heatmap of one image.

    Attributes
    ----------
    probability
        P(positive class), identical (within 1e-5) to the classifier's output.
    heatmap
        float32 (H, W) in [0, 1] on the SOURCE image's pixel grid (same H, W as the stored
        pixels; crop, resize and letterbox undone). 1 marks the strongest evidence for the
        positive class; all zeros when no region raises the positive logit.
    """

    probability: float
    heatmap: npt.NDArray[np.float32]


@runtime_checkable
class FeatureNetwork(Protocol):
    """The timm split of ``forward`` into a feature extractor and a classifier head."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last stage's feature map (N, C, h, w)."""
        ...

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (N, 1) from the feature map."""
        ...


def grad_cam(
    net: torch.nn.Module,
    batch: torch.Tensor,
    *,
    autocast: bool = False,
    temperature: float = 1.0,
    logit_bias: float = 0.0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """Run one forward/backward pass and return probabilities and raw Grad-CAM maps.

    Parameters
    ----------
    net
        A timm network in eval mode with one output logit.
    batch
        Preprocessed input (N, C, S, S) on the network's device.
    autocast
        Run the forward pass under ``torch.autocast`` (CUDA mixed precision), as
        :meth:`model.infer.Classifier.predict` does.
    temperature, logit_bias
        The card's calibration: probabilities are ``sigmoid(logit / T + b)``.

    Returns
    -------
    tuple
        ``(probabilities (N,) float64, cams (N, h, w) float32 >= 0)`` where ``h, w`` is the
        last stage's spatial size.

    Raises
    ------
    TypeError
        When the network has no ``forward_features``/``forward_head`` (not a timm model).
    """
    if not isinstance(net, FeatureNetwork):
        raise TypeError(f"{type(net).__name__} has no forward_features/forward_head")
    feature_net = cast(FeatureNetwork, net)
    with torch.enable_grad(), torch.autocast(device_type=batch.device.type, enabled=autocast):
        features = feature_net.forward_features(batch)
        if features.ndim != 4:
            raise TypeError(f"last stage output has shape {tuple(features.shape)}, not (N,C,h,w)")
        logits = feature_net.forward_head(features).float().reshape(-1)
        (grads,) = torch.autograd.grad(logits.sum(), features)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * features.detach().float()).sum(dim=1))
    probs = torch.sigmoid(logits.detach() / temperature + logit_bias)
    return (
        probs.cpu().numpy().astype(np.float64),
        cams.cpu().numpy().astype(np.float32),
    )


def head_cams(
    net: torch.nn.Module, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the head on computed features and return logits, pooled features and Grad-CAMs.

    The single-pass form of :func:`grad_cam` for the classify stage: ``features`` come from a
    forward pass without autograd (``torch.no_grad``); only the head (pooling and linear
    layer) is run with gradients, so the Grad-CAM of every image costs one backward through
    the head, not a second forward through the network. The maps equal :func:`grad_cam`'s
    (the gradient of the logit with respect to the last stage only flows through the head).

    Parameters
    ----------
    net
        A timm network in eval mode with one output logit (``forward_head(pre_logits=True)``
        and ``get_classifier``).
    features
        The last stage's output (N, C, h, w), e.g. ``net.forward_features(batch)``.

    Returns
    -------
    tuple
        ``(logits (N,), pooled (N, D), cams (N, h, w) float32 >= 0)``, detached.

    Raises
    ------
    TypeError
        When ``features`` is not (N, C, h, w) or the network has no timm head API.
    """
    if features.ndim != 4:
        raise TypeError(f"last stage output has shape {tuple(features.shape)}, not (N,C,h,w)")
    forward_head = getattr(net, "forward_head", None)
    get_classifier = getattr(net, "get_classifier", None)
    if forward_head is None or get_classifier is None:
        raise TypeError(f"{type(net).__name__} has no forward_head/get_classifier")
    with torch.enable_grad():
        leaf = features.detach().requires_grad_(True)
        pooled = forward_head(leaf, pre_logits=True)
        logits = get_classifier()(pooled).reshape(-1)
        (grads,) = torch.autograd.grad(logits.float().sum(), leaf)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * leaf.detach().float()).sum(dim=1))
    return logits.detach(), pooled.detach(), cams


def cam_to_source(
    cam: npt.NDArray[np.float32],
    source_shape: tuple[int, int],
    spec: PreprocessSpec,
    box: CropBox | None = None,
) -> npt.NDArray[np.float32]:
    """Map a Grad-CAM map from the model input back onto the source pixel grid.

    The map is upsampled (bilinear) to the square model input, the part that holds the
    image (:func:`model.preprocess.input_placement`: all of it for ``squash``, without the
    padding for ``letterbox``) is resized to the crop box of :func:`preprocess` and pasted
    at its place in ``source_shape`` (cropped borders get 0), then scaled to [0, 1] by its
    maximum.

    Parameters
    ----------
    cam
        (h, w) non-negative map of the last stage.
    source_shape
        (H, W) of the stored pixels.
    spec
        Preprocessing spec of the bundle.
    box
        Crop box :func:`model.preprocess.crop_box` used (default: the whole source).
    """
    height, width = int(source_shape[0]), int(source_shape[1])
    box = box if box is not None else CropBox(0, height, 0, width)
    place = input_placement((box.bottom - box.top, box.right - box.left), spec)
    size = spec.input_size
    grid = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    full = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    inner = full[
        :,
        :,
        place.pad_top : place.pad_top + place.resized_h,
        place.pad_left : place.pad_left + place.resized_w,
    ]
    kept = F.interpolate(
        inner,
        size=(box.bottom - box.top, box.right - box.left),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    source = torch.zeros((height, width), dtype=torch.float32)
    source[box.top : box.bottom, box.left : box.right] = kept
    peak = float(source.max())
    if peak <= 0.0 or not np.isfinite(peak):
        return np.zeros((height, width), dtype=np.float32)
    heat = torch.clamp(source / peak, 0.0, 1.0)
    return np.ascontiguousarray(heat.numpy(), dtype=np.float32)
