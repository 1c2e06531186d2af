"""MONAI training augmentations, applied to cached preprocessed tensors (train split only).

They cover what differs between the training JPEGs and what hospitals send, beyond what
:func:`model.preprocess.preprocess` already normalises: residual aspect-ratio differences
(anisotropic zoom), positioning (rotation, translation), non-linear intensity curves of
other processing chains and display LUTs (gamma, random monotone histogram curves),
detector noise and resolution (Gaussian noise and smoothing).
"""

from __future__ import annotations

import math

import torch
from monai.transforms.compose import Compose
from monai.transforms.intensity.array import (
    RandAdjustContrast,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandHistogramShift,
    RandShiftIntensity,
)
from monai.transforms.spatial.array import RandAffine

AUGMENTATION_SUMMARY = (
    "MONAI RandAffine(p=0.8, rot 10deg, translate 6%, zoom rows +/-15% and columns "
    "+/-10% independently = aspect ratio jitter), RandAdjustContrast(p=0.5, gamma "
    "0.6-1.6), RandHistogramShift(p=0.3, 4-8 control points), RandGaussianSmooth(p=0.2, "
    "sigma 0.25-1 px), RandGaussianNoise(p=0.2, std<=0.05), RandShiftIntensity(p=0.3, "
    "+/-0.1); train split only"
)


def build_augmentation(input_size: int) -> Compose:
    """Build the training augmentation chain (see :data:`AUGMENTATION_SUMMARY`).

    Parameters
    ----------
    input_size
        Side of the square input (sets the translation range in pixels).
    """
    shift_px = 0.06 * input_size
    return Compose(
        [
            RandAffine(
                prob=0.8,
                rotate_range=(math.radians(10.0),),
                translate_range=(shift_px, shift_px),
                scale_range=(0.15, 0.1),
                padding_mode="border",
                mode="bilinear",
            ),
            RandAdjustContrast(prob=0.5, gamma=(0.6, 1.6)),
            RandHistogramShift(num_control_points=(4, 8), prob=0.3),
            RandGaussianSmooth(sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.2),
            RandGaussianNoise(prob=0.2, mean=0.0, std=0.05),
            RandShiftIntensity(offsets=0.1, prob=0.3),
        ]
    )


def augment_batch(aug: Compose, batch: torch.Tensor) -> torch.Tensor:
    """Apply ``aug`` to every (C, H, W) image of an (N, C, H, W) batch.

    Parameters
    ----------
    aug
        Transform from :func:`build_augmentation`.
    batch
        Float tensor.
    """
    out = [torch.as_tensor(aug(img)).as_subclass(torch.Tensor) for img in batch]
    return torch.stack(out).float()
