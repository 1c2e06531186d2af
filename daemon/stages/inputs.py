"""The one path from a decoded DICOM image to what the model reads (serving and evaluation)."""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from dicom_io.reader import DecodedImage
from model.pixels import PixelMeta


def to_pixel_meta(image: DecodedImage) -> PixelMeta:
    """Map the DICOM reader's pixel description onto the model's (the model never sees pydicom).

    The grey levels come from :mod:`dicom_io.grayscale` (:func:`model_pixels`): P-values with
    an identity LINEAR_EXACT window when a VOI transform was applied, else modality values
    with their polarity and no window (the model's percentile range applies).
    """
    grey = image.presentation
    if grey is None:
        return PixelMeta(
            photometric=image.photometric,
            rescale_slope=image.rescale_slope,
            rescale_intercept=image.rescale_intercept,
            window_center=image.window_center,
            window_width=image.window_width,
            voi_lut_function=image.voi_lut_function,
            bits_stored=image.bits_stored,
            pixel_spacing_mm=image.pixel_spacing_mm,
        )
    window = grey.window
    return PixelMeta(
        photometric=grey.photometric,
        window_center=None if window is None else window[0],
        window_width=None if window is None else window[1],
        voi_lut_function="LINEAR" if window is None else window[2],
        bits_stored=image.bits_stored,
        pixel_spacing_mm=image.pixel_spacing_mm,
    )


def model_pixels(image: DecodedImage) -> npt.NDArray[Any]:
    """Return the grey levels a viewer shows (P-values after the VOI step, PS3.4 N.2)."""
    return image.pixels if image.presentation is None else image.presentation.values


def model_input(image: DecodedImage) -> tuple[npt.NDArray[Any], PixelMeta]:
    """Return what the classifier (and its Grad-CAM) reads: the one serving input path.

    The grayscale pipeline of :mod:`dicom_io.grayscale` up to the Modality LUT and polarity,
    with the header's VOI window passed on in :class:`model.pixels.PixelMeta`: a bundle
    whose ``intensity`` is ``image_range`` ignores it (its range comes from the image, as
    for its training JPEGs), a legacy ``voi`` bundle applies it. Training, evaluation
    (``daemon.renditions``) and the daemon all read DICOM through this function.
    """
    grey = image.presentation
    before_voi = None if grey is None else (grey.unwindowed or grey)
    if before_voi is None or before_voi.voi_applied:
        return image.pixels, to_pixel_meta(image)
    meta = PixelMeta(
        photometric=before_voi.photometric,
        window_center=image.window_center,
        window_width=image.window_width,
        voi_lut_function=image.voi_lut_function,
        bits_stored=image.bits_stored,
        pixel_spacing_mm=image.pixel_spacing_mm,
    )
    return before_voi.values, meta
