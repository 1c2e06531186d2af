"""The single preprocessing function shared by training, evaluation and the daemon.

Stored pixel values go through the DICOM grayscale pipeline (PS3.4 Annex N.2: Modality
LUT -> VOI LUT -> Presentation LUT) and then through MONAI spatial and intensity
transforms to the model input tensor.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from monai.transforms.compose import Compose
from monai.transforms.croppad.array import SpatialPad
from monai.transforms.intensity.array import NormalizeIntensity
from monai.transforms.spatial.array import Resize
from monai.transforms.utility.array import RepeatChannel
from PIL import Image, ImageOps, UnidentifiedImageError

from model.pixels import PixelMeta

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# ITU-R BT.601 luma weights, the same PIL uses for mode "L".
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@dataclass(frozen=True)
class PreprocessSpec:
    """How stored pixels become a model input; stored in the bundle card.

    Attributes
    ----------
    input_size
        Side of the square model input in pixels. The whole image is kept: the longer side
        is resized to ``input_size`` (area interpolation) and the shorter side is padded
        symmetrically with black (letterbox).
    channels
        1, or 3 (the grey image replicated).
    mean, std
        Normalisation applied last: ``(x - mean) / std`` on the [0, 1] image.
    percentile_low, percentile_high
        Intensity range used when the image carries no VOI window: these percentiles of
        the modality-rescaled image map to 0 and 1 (values outside are clipped).
    """

    input_size: int
    channels: int
    mean: float = 0.5
    std: float = 0.25
    percentile_low: float = 0.5
    percentile_high: float = 99.5

    def __post_init__(self) -> None:
        """Validate eagerly, naming the offending argument."""
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {self.input_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise ValueError(
                "need 0 <= percentile_low < percentile_high <= 100, got "
                f"{self.percentile_low}, {self.percentile_high}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Build from :meth:`to_dict` output; unknown keys are an error.

        Parameters
        ----------
        data
            Mapping with at least ``input_size`` and ``channels``.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**data)


def to_grey(pixels: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Return a 2-D float64 array from (H, W), (H, W, 1) or (H, W, 3) input.

    Parameters
    ----------
    pixels
        Stored pixel values; RGB is reduced to luma (ITU-R BT.601).
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr.astype(np.float64) @ _LUMA_WEIGHTS
    if arr.ndim != 2:
        raise ValueError(f"pixels must have shape (H, W) or (H, W, 3), got {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image too small: {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"pixels must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def apply_voi_window(
    values: npt.NDArray[np.float64], center: float, width: float, function: str
) -> npt.NDArray[np.float64]:
    """Apply a VOI LUT window, output in [0, 1] (PS3.3 C.11.2.1.2).

    Parameters
    ----------
    values
        Modality-rescaled values.
    center, width
        Window Center (0028,1050) and Window Width (0028,1051).
    function
        VOI LUT Function (0028,1056): LINEAR (C.11.2.1.2.1), LINEAR_EXACT (C.11.2.1.3.2)
        or SIGMOID (C.11.2.1.3.1).
    """
    if function == "LINEAR":
        if width <= 1.0:
            return (values > center - 0.5).astype(np.float64)
        out = (values - (center - 0.5)) / (width - 1.0) + 0.5
        return np.clip(out, 0.0, 1.0)
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -500.0, 500.0)))
    raise ValueError(f"unsupported VOI LUT function {function!r}")


def scale_percentiles(
    values: npt.NDArray[np.float64], low: float, high: float
) -> npt.NDArray[np.float64]:
    """Map the ``low``/``high`` percentiles of ``values`` to 0/1 and clip.

    Parameters
    ----------
    values
        Image values.
    low, high
        Percentiles in [0, 100].
    """
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        # Constant (or nearly) image: no contrast to stretch.
        return np.zeros_like(values)
    scaled: npt.NDArray[np.float64] = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return scaled


def to_unit_range(pixels: npt.NDArray[Any], meta: PixelMeta, spec: PreprocessSpec) -> FloatArray:
    """Run the grayscale pipeline up to a [0, 1] image where 1 is white (PS3.4 N.2).

    Parameters
    ----------
    pixels
        Stored values (H, W) or RGB (H, W, 3).
    meta
        Pixel metadata from the reader.
    spec
        Preprocessing spec (percentiles used when no window is present).
    """
    is_rgb = meta.photometric == "RGB" or (np.ndim(pixels) == 3 and np.shape(pixels)[2] == 3)
    values = to_grey(pixels)
    if not np.all(np.isfinite(values)):
        raise ValueError("pixels contain NaN or infinite values")
    if not is_rgb:
        values = values * meta.rescale_slope + meta.rescale_intercept
    problem = meta.window_problem()
    if problem not in (None, "absent"):
        logger.warning(
            "ignoring unusable VOI window; using the image intensity range",
            extra={"reason": problem},
        )
    if meta.has_window and not is_rgb:
        assert meta.window_center is not None and meta.window_width is not None
        unit = apply_voi_window(
            values, meta.window_center, meta.window_width, meta.voi_lut_function
        )
    else:
        unit = scale_percentiles(values, spec.percentile_low, spec.percentile_high)
    if meta.photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)


def _spatial_chain(spec: PreprocessSpec) -> Compose:
    steps: list[Any] = [
        Resize(spatial_size=spec.input_size, size_mode="longest", mode="area"),
        SpatialPad(spatial_size=(spec.input_size, spec.input_size), mode="constant"),
    ]
    if spec.channels == 3:
        steps.append(RepeatChannel(repeats=3))
    steps.append(
        NormalizeIntensity(
            subtrahend=np.array([spec.mean], dtype=np.float32),
            divisor=np.array([spec.std], dtype=np.float32),
        )
    )
    return Compose(steps)


def preprocess(pixels: npt.NDArray[Any], meta: PixelMeta, spec: PreprocessSpec) -> FloatArray:
    """Turn stored pixel values into the model input.

    Steps: Modality LUT (PS3.3 C.11.1, linear rescale) -> VOI window (PS3.3 C.11.2, if
    given; else percentile range of the image) -> MONOCHROME1 inversion (PS3.3
    C.7.6.3.1.2) -> [0, 1] -> letterbox resize to ``spec.input_size`` -> channels ->
    normalisation. Deterministic.

    Parameters
    ----------
    pixels
        (H, W) stored values of any integer/float dtype, or (H, W, 3) RGB.
    meta
        Pixel metadata.
    spec
        Preprocessing spec from the bundle card.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (channels, input_size, input_size).

    Raises
    ------
    ValueError
        On shapes, dtypes or values that cannot be an image.
    """
    unit = to_unit_range(pixels, meta, spec)
    out = _spatial_chain(spec)(unit[np.newaxis])
    arr = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out)
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_image_file(path: Path) -> tuple[npt.NDArray[np.uint8], PixelMeta]:
    """Read a JPEG/PNG file as 8-bit greyscale with default metadata.

    Parameters
    ----------
    path
        Image file; EXIF orientation is applied, colour is reduced to luma.

    Raises
    ------
    ValueError
        When the file cannot be decoded as an image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
            grey = (oriented if oriented is not None else img).convert("L")
            arr = np.asarray(grey, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    return arr, PixelMeta(bits_stored=8)
