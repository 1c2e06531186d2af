"""Pixels a viewer shows: a heatmap blended over a greyscale image, and a burned-in banner.

Pure numpy/Pillow helpers used by :mod:`dicom_io.sc`. Nothing here reads or writes DICOM, and
nothing here maps stored values to grey levels: the displayed image comes from the one
grayscale pipeline (:mod:`dicom_io.grayscale`, then ``model.preprocess.to_display``), so the
picture shows the grey levels the model saw.
The banner is drawn in a black strip added above the image, so it never hides anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

UInt8Image = npt.NDArray[np.uint8]

MIN_WIDTH_PX = 512
"""Images narrower than this are enlarged (integer factor) so the banner stays legible."""

HEAT_FLOOR = 0.2
"""Heatmap values at or below this are not coloured (the image shows through unchanged)."""

HEAT_ALPHA_MAX = 0.55
"""Opacity of the colour where the heatmap is 1."""


def _check_display(display: npt.NDArray[Any]) -> None:
    if display.ndim != 2 or display.dtype != np.uint8:
        raise ValueError(
            f"display must be a uint8 (H, W) array, got {display.dtype} {display.shape}"
        )
    if display.shape[0] < 1 or display.shape[1] < 1:
        raise ValueError("display must not be empty")


_JET_CENTRES = (3.0, 2.0, 1.0)
"""Where the red, green and blue ramps of "jet" peak, in units of ``4 * value``."""


def jet(values: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Map values in [0, 1] to RGB in [0, 1] with the classic "jet" colour scale."""
    v = np.clip(values.astype(np.float32), 0.0, 1.0)
    return np.stack([_jet_channel(v, c) for c in _JET_CENTRES], axis=-1)


def _jet_channel(v: npt.NDArray[np.float32], centre: float) -> npt.NDArray[np.float32]:
    """One colour ramp of :func:`jet` on values already clipped to [0, 1] (float32)."""
    ramp = np.float32(4.0) * v
    ramp -= np.float32(centre)
    np.abs(ramp, out=ramp)
    np.subtract(np.float32(1.5), ramp, out=ramp)
    return np.clip(ramp, 0.0, 1.0, out=ramp)


def blend_heatmap(
    display: UInt8Image,
    heatmap: npt.NDArray[np.floating[Any]] | None,
    *,
    floor: float = HEAT_FLOOR,
    alpha_max: float = HEAT_ALPHA_MAX,
) -> UInt8Image:
    """Return an RGB uint8 ``(H, W, 3)`` image: ``display`` with ``heatmap`` blended in.

    Parameters
    ----------
    display
        uint8 ``(H, W)`` greyscale image as it should be seen (VOI window applied,
        MONOCHROME1 already inverted).
    heatmap
        float ``(H, W)`` in [0, 1] on the same pixel grid, or None for the plain image.
        Non-finite values count as 0.
    floor, alpha_max
        Values up to ``floor`` are transparent; above it the opacity rises linearly to
        ``alpha_max`` at 1.

    Raises
    ------
    ValueError
        If the arrays have the wrong type or do not share one grid.
    """
    _check_display(display)
    if heatmap is None:
        return display[..., None].repeat(3, axis=2).copy()
    if heatmap.shape != display.shape:
        raise ValueError(
            f"heatmap shape {heatmap.shape} differs from the image shape {display.shape}"
        )
    if not 0.0 <= floor < 1.0 or not 0.0 <= alpha_max <= 1.0:
        raise ValueError("floor must be in [0, 1) and alpha_max in [0, 1]")
    heat = np.nan_to_num(heatmap.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    heat = np.clip(heat, 0.0, 1.0)
    alpha = np.clip((heat - floor) / (1.0 - floor), 0.0, 1.0) * alpha_max
    shown = display.astype(np.float32) / 255.0 * (1.0 - alpha)  # the image's share
    out: UInt8Image = np.empty((*display.shape, 3), dtype=np.uint8)
    for k, centre in enumerate(_JET_CENTRES):  # one channel at a time: no (H, W, 3) floats
        colour = _jet_channel(heat, centre)
        colour *= alpha
        colour += shown
        colour *= 255.0
        out[..., k] = np.round(colour)
    return out


def enlarge(rgb: UInt8Image, min_width_px: int = MIN_WIDTH_PX) -> UInt8Image:
    """Enlarge ``rgb`` by an integer factor (bilinear) to at least ``min_width_px`` wide."""
    factor = max(1, math.ceil(min_width_px / rgb.shape[1]))
    if factor == 1:
        return rgb
    size = (rgb.shape[1] * factor, rgb.shape[0] * factor)
    resized = Image.fromarray(rgb, mode="RGB").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def add_banner(rgb: UInt8Image, lines: Sequence[str]) -> UInt8Image:
    """Return ``rgb`` with a black strip on top carrying ``lines`` in white/yellow text.

    The first line (the warning) is drawn in yellow, the others in white. The font size
    follows the image width; a line too long for the width is shortened with an ellipsis so
    nothing is silently cut mid-character.

    Raises
    ------
    ValueError
        If ``rgb`` is not uint8 ``(H, W, 3)`` or ``lines`` is empty.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be a uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    if not lines:
        raise ValueError("lines must not be empty")
    width = rgb.shape[1]
    size_px = max(10, width // 32)
    font = ImageFont.load_default(size=size_px)
    margin = max(4, size_px // 2)
    line_h = int(size_px * 1.3)
    height = margin * 2 + line_h * len(lines)
    strip = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for i, text in enumerate(lines):
        fitted = _fit(draw, text, font, width - 2 * margin)
        colour = (255, 221, 0) if i == 0 else (255, 255, 255)
        draw.text((margin, margin + i * line_h), fitted, fill=colour, font=font)
    return np.concatenate([np.asarray(strip, dtype=np.uint8), rgb], axis=0)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, max_px: int) -> str:
    if draw.textlength(text, font=font) <= max_px:
        return text
    while text and draw.textlength(text + "…", font=font) > max_px:
        text = text[:-1]
    return text + "…"


def render_result_image(
    display: UInt8Image,
    heatmap: npt.NDArray[np.floating[Any]] | None,
    lines: Sequence[str],
    *,
    min_width_px: int = MIN_WIDTH_PX,
) -> UInt8Image:
    """Blend, enlarge if small, and add the banner: the pixels of the result image."""
    return add_banner(enlarge(blend_heatmap(display, heatmap), min_width_px), lines)


__all__ = [
    "add_banner",
    "blend_heatmap",
    "enlarge",
    "jet",
    "render_result_image",
]
