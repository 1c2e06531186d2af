"""MONAI training augmentations, applied to cached preprocessed tensors (train split only)."""

from __future__ import annotations

import math

import torch
from monai.transforms.compose import Compose
from monai.transforms.intensity.array import RandAdjustContrast, RandShiftIntensity
from monai.transforms.spatial.array import RandAffine


def build_augmentation(input_size: int) -> Compose:
    """Build the training augmentation chain.

    Rotation (+/-10 deg), translation (+/-6 %), zoom (+/-10 %), contrast (gamma) and a
    small intensity shift, per image, on a channel-first normalised tensor.

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
                scale_range=(0.1, 0.1),
                padding_mode="border",
                mode="bilinear",
            ),
            RandAdjustContrast(prob=0.5, gamma=(0.7, 1.4)),
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
