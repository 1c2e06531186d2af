"""The single preprocessing function shared by training, evaluation and the daemon.

Stored pixel values go through the DICOM grayscale pipeline (PS3.4 Annex N.2: Modality
LUT -> VOI LUT -> Presentation LUT) and then through MONAI spatial and intensity
transforms to the model input tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
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

DEFAULT_PERCENTILE_LOW = 0.5
DEFAULT_PERCENTILE_HIGH = 99.5

GEOMETRIES = frozenset({"squash", "letterbox"})
INTENSITIES = frozenset({"image_range", "voi"})

# Cards written before ``geometry``/``intensity``/``crop_borders`` existed were trained and
# served with a letterbox, the VOI window when present and no border cropping.
_LEGACY_SPEC_DEFAULTS: dict[str, Any] = {
    "geometry": "letterbox",
    "intensity": "voi",
    "crop_borders": False,
    "source_size": None,
}

# A border row/column differs from the image extreme by at most this fraction of the range.
BORDER_TOLERANCE = 0.02
# Border cropping never removes more than this fraction of a side (a mostly uniform
# image is content, not a border).
_MAX_BORDER_FRACTION = 0.45


@dataclass(frozen=True)
class PreprocessSpec:
    """How stored pixels become a model input; stored in the bundle card.

    Attributes
    ----------
    input_size
        Side of the square model input in pixels.
    channels
        1, or 3 (the grey image replicated).
    mean, std
        Normalisation applied last: ``(x - mean) / std`` on the [0, 1] image.
    percentile_low, percentile_high
        Intensity range used when the image carries no VOI window: these percentiles of
        the modality-rescaled image map to 0 and 1 (values outside are clipped).
    geometry
        ``squash``: the image (after border cropping) is resized to ``input_size`` x
        ``input_size`` whatever its aspect ratio -- the geometry of the Kermany training
        JPEGs, which their publisher squashed to 224 x 224, so a real radiograph squashed
        the same way looks like what the network learned. ``letterbox``: the longer side is
        resized and the shorter side padded with black (legacy bundles).
    intensity
        ``image_range``: the model sees the Modality LUT output (PS3.3 C.11.1) stretched
        between its own percentiles, MONOCHROME1 inverted; the VOI window, a display
        preference of the sending site, is used only for display (:func:`to_display`). A
        linear re-encoding of the same radiograph (bit depth, slope/intercept, any window)
        then gives the same model input. ``voi``: VOI window when present, else the
        percentile range (legacy bundles).
    crop_borders
        Crop uniform borders at the image extremes (Pixel Padding, PS3.3 C.7.5.1.1.2, and
        black/white frames) before resizing, so padding neither shrinks the anatomy nor
        shifts the intensity percentiles.
    source_size
        With ``squash``: first squash to ``source_size`` x ``source_size`` (area), the
        resolution of the training images (Kermany: 224, as published), then to
        ``input_size`` -- so the last resampling step is exactly the one training images
        went through. None: one step.
    """

    input_size: int
    channels: int
    mean: float = 0.5
    std: float = 0.25
    percentile_low: float = DEFAULT_PERCENTILE_LOW
    percentile_high: float = DEFAULT_PERCENTILE_HIGH
    geometry: str = "squash"
    intensity: str = "image_range"
    crop_borders: bool = True
    source_size: int | None = None

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
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {sorted(GEOMETRIES)}, got {self.geometry!r}")
        if self.source_size is not None and self.source_size < 8:
            raise ValueError(f"source_size must be >= 8 or None, got {self.source_size}")
        if self.intensity not in INTENSITIES:
            raise ValueError(
                f"intensity must be one of {sorted(INTENSITIES)}, got {self.intensity!r}"
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
            Mapping with at least ``input_size`` and ``channels``. Keys absent from cards of
        earlier versions take their legacy values (letterbox, VOI window, no cropping).
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**{**_LEGACY_SPEC_DEFAULTS, **data})


def _validated(pixels: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Return ``pixels`` as (H, W) or (H, W, 3) after checking shape and dtype (no copy)."""
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"pixels must have shape (H, W) or (H, W, 3), got {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image too small: {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"pixels must be numeric, got dtype {arr.dtype}")
    return arr


def to_grey(pixels: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Return a 2-D float64 array from (H, W), (H, W, 1) or (H, W, 3) input.

    Parameters
    ----------
    pixels
        Stored pixel values; RGB is reduced to luma (ITU-R BT.601).
    """
    arr = _validated(pixels)
    if arr.ndim == 3:
        return arr.astype(np.float64) @ _LUMA_WEIGHTS
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
    return _stretch(values, float(lo), float(hi))


def _stretch(values: npt.NDArray[np.float64], lo: float, hi: float) -> npt.NDArray[np.float64]:
    """Map ``lo``/``hi`` to 0/1 and clip; all zeros when there is no contrast."""
    if hi <= lo:
        # Constant (or nearly) image: no contrast to stretch.
        return np.zeros_like(values)
    scaled: npt.NDArray[np.float64] = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return scaled


def histogram_percentiles(
    values: npt.NDArray[np.float64], counts: npt.NDArray[np.int64], qs: Sequence[float]
) -> list[float]:
    """Percentiles of a sample given as sorted distinct values and their counts.

    Identical to ``numpy.percentile(sample, qs)`` (method ``linear``) on the expanded
    sample, without sorting it.

    Parameters
    ----------
    values
        Distinct values, ascending.
    counts
        How often each value occurs (zeros allowed).
    qs
        Percentiles in [0, 100].
    """
    cum = np.cumsum(counts)
    n = int(cum[-1])
    if n == 0:
        raise ValueError("percentiles of an empty sample")
    out: list[float] = []
    for q in qs:
        pos = q / 100.0 * (n - 1)
        k = int(np.floor(pos))
        frac = pos - k
        v_k = float(values[int(np.searchsorted(cum, k, side="right"))])
        v_next = float(values[int(np.searchsorted(cum, min(k + 1, n - 1), side="right"))])
        out.append(v_k + frac * (v_next - v_k) if frac > 0 else v_k)
    return out


# Integer images whose value range fits this many entries go through a lookup table:
# every grey-level step is a function of the stored value alone (PS3.4 N.2), so mapping
# the distinct values once and indexing is exact and avoids float work per pixel.
_LUT_MAX_ENTRIES = 1 << 17
_LUT_MIN_PIXELS = 1 << 14


def _unit_lookup(
    arr: npt.NDArray[Any], meta: PixelMeta, percentile_low: float, percentile_high: float
) -> FloatArray | None:
    """Run the grayscale pipeline of :func:`unit_intensity` as a lookup table, or return None."""
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.size < _LUT_MIN_PIXELS:
        return None
    lo_stored, hi_stored = int(arr.min()), int(arr.max())
    n_entries = hi_stored - lo_stored + 1
    if n_entries > _LUT_MAX_ENTRIES:
        return None
    if np.issubdtype(arr.dtype, np.unsignedinteger) and hi_stored < 1 << 16:
        index = arr if lo_stored == 0 else arr - arr.dtype.type(lo_stored)
    elif arr.dtype.itemsize <= 4 and np.issubdtype(arr.dtype, np.signedinteger):
        index = np.subtract(arr, lo_stored, dtype=np.int32)  # the range fits (checked above)
    else:
        index = (arr.astype(np.int64) - lo_stored).astype(np.int32)
    stored = np.arange(lo_stored, hi_stored + 1, dtype=np.float64)
    values = stored * meta.rescale_slope + meta.rescale_intercept
    if meta.has_window:
        assert meta.window_center is not None and meta.window_width is not None
        table = apply_voi_window(
            values, meta.window_center, meta.window_width, meta.voi_lut_function
        )
    else:
        counts = np.bincount(index.ravel(), minlength=n_entries)
        ascending = slice(None) if meta.rescale_slope > 0 else slice(None, None, -1)
        p_lo, p_hi = histogram_percentiles(
            values[ascending], counts[ascending], (percentile_low, percentile_high)
        )
        table = _stretch(values, p_lo, p_hi)
    if meta.photometric == "MONOCHROME1":
        table = 1.0 - table
    lut = table.astype(np.float32)
    unit: FloatArray = lut[index]
    return unit


def unit_intensity(
    pixels: npt.NDArray[Any],
    meta: PixelMeta,
    percentile_low: float = DEFAULT_PERCENTILE_LOW,
    percentile_high: float = DEFAULT_PERCENTILE_HIGH,
) -> FloatArray:
    """Run the grayscale pipeline up to a [0, 1] image where 1 is white (PS3.4 N.2).

    The one intensity code path shared by :func:`preprocess` (model input) and
    :func:`to_display` (what a viewer shows): Modality LUT (PS3.3 C.11.1, linear rescale)
    -> VOI window (PS3.3 C.11.2.1.2, if usable; else the percentile range of the image)
    -> MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2). No spatial change.

    Parameters
    ----------
    pixels
        Stored values (H, W) or RGB (H, W, 3).
    meta
        Pixel metadata from the reader.
    percentile_low, percentile_high
        Percentiles mapped to 0 and 1 when no usable VOI window is present.

    Returns
    -------
    numpy.ndarray
        float32 (H, W) in [0, 1].
    """
    arr = _validated(pixels)
    is_rgb = meta.photometric == "RGB" or arr.ndim == 3
    problem = meta.window_problem()
    if problem not in (None, "absent"):
        logger.warning(
            "ignoring unusable VOI window; using the image intensity range",
            extra={"reason": problem},
        )
    if not is_rgb:
        fast = _unit_lookup(arr, meta, percentile_low, percentile_high)
        if fast is not None:
            return fast
    values = to_grey(arr)
    if not np.all(np.isfinite(values)):
        raise ValueError("pixels contain NaN or infinite values")
    if not is_rgb:
        values = values * meta.rescale_slope + meta.rescale_intercept
    if meta.has_window and not is_rgb:
        assert meta.window_center is not None and meta.window_width is not None
        unit = apply_voi_window(
            values, meta.window_center, meta.window_width, meta.voi_lut_function
        )
    else:
        unit = scale_percentiles(values, percentile_low, percentile_high)
    if meta.photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)


def to_unit_range(pixels: npt.NDArray[Any], meta: PixelMeta, spec: PreprocessSpec) -> FloatArray:
    """Return the [0, 1] model intensity of ``pixels`` as ``spec.intensity`` says.

    ``image_range`` ignores the VOI window (display only) and stretches the Modality LUT
    output between the spec's percentiles; ``voi`` is :func:`unit_intensity` as is.

    Parameters
    ----------
    pixels
        Stored values (H, W) or RGB (H, W, 3).
    meta
        Pixel metadata from the reader.
    spec
        Preprocessing spec.
    """
    if spec.intensity == "image_range":
        meta = replace(meta, window_center=None, window_width=None, voi_lut_function="LINEAR")
    return unit_intensity(pixels, meta, spec.percentile_low, spec.percentile_high)


@dataclass(frozen=True)
class CropBox:
    """Rows ``top:bottom`` and columns ``left:right`` of the source that hold the image."""

    top: int
    bottom: int
    left: int
    right: int


def _border_run(flat: npt.NDArray[np.bool_], limit: int) -> int:
    """Return the number of leading True values of ``flat`` (0 if above ``limit``)."""
    run = int(np.argmin(flat)) if not flat.all() else flat.size
    return run if run <= limit else 0


def content_box(
    pixels: npt.NDArray[Any], tolerance: float = BORDER_TOLERANCE, passes: int = 3
) -> CropBox:
    """Return the box inside uniform borders at the image's extreme values.

    A border row (column) has all its values within ``tolerance`` x (max - min) of the
    image minimum, or all of them of the maximum: Pixel Padding (PS3.3 C.7.5.1.1.2),
    collimator blanking or a frame added by a viewer. Only edge runs are removed, at most
    45 % of a side each. The test is invariant to any linear Modality LUT or inversion. It
    is repeated on what is left (``passes``): a Pixel Padding value outside the image's
    range hides the image's own dark frame until the padding is gone, and the result must
    be the same with and without padding.

    Parameters
    ----------
    pixels
        (H, W) or (H, W, 3) stored values.
    tolerance
        Fraction of the value range.
    passes
        Maximum number of border-removal passes.
    """
    arr = _validated(pixels)
    box = CropBox(0, arr.shape[0], 0, arr.shape[1])
    for _ in range(passes):
        inner = _content_box_once(arr[box.top : box.bottom, box.left : box.right], tolerance)
        if inner == CropBox(0, box.bottom - box.top, 0, box.right - box.left):
            break
        box = CropBox(
            box.top + inner.top,
            box.top + inner.bottom,
            box.left + inner.left,
            box.left + inner.right,
        )
    return box


def _content_box_once(arr: npt.NDArray[Any], tolerance: float) -> CropBox:
    """Run one pass of :func:`content_box`."""
    grey = arr if arr.ndim == 2 else arr.max(axis=2)
    height, width = grey.shape
    lo, hi = float(grey.min()), float(grey.max())
    full = CropBox(0, height, 0, width)
    if hi <= lo:
        return full
    tol = tolerance * (hi - lo)
    row_min, row_max = grey.min(axis=1), grey.max(axis=1)
    col_min, col_max = grey.min(axis=0), grey.max(axis=0)
    rows = (row_max <= lo + tol) | (row_min >= hi - tol)
    cols = (col_max <= lo + tol) | (col_min >= hi - tol)
    if rows.all() or cols.all():
        return full
    max_h, max_w = int(_MAX_BORDER_FRACTION * height), int(_MAX_BORDER_FRACTION * width)
    top, bottom = _border_run(rows, max_h), _border_run(rows[::-1], max_h)
    left, right = _border_run(cols, max_w), _border_run(cols[::-1], max_w)
    if height - top - bottom < 2 or width - left - right < 2:
        return full
    return CropBox(top, height - bottom, left, width - right)


def to_display(
    pixels: npt.NDArray[Any], meta: PixelMeta, spec: PreprocessSpec | None = None
) -> npt.NDArray[np.uint8]:
    """Return the image as a viewer presents it: uint8 (H, W), 255 is white, no resize.

    The same intensity path as :func:`preprocess` (:func:`unit_intensity`: Modality LUT,
    VOI window or percentile fallback, MONOCHROME1 inversion; PS3.4 N.2), quantised to
    8 bits for a Secondary Capture (PS3.3 A.8) or an overlay.

    Parameters
    ----------
    pixels
        Stored values (H, W) or RGB (H, W, 3).
    meta
        Pixel metadata.
    spec
        Bundle spec whose percentiles to use without a window (default 0.5 / 99.5).
    """
    low = spec.percentile_low if spec is not None else DEFAULT_PERCENTILE_LOW
    high = spec.percentile_high if spec is not None else DEFAULT_PERCENTILE_HIGH
    unit = unit_intensity(pixels, meta, low, high)
    shown: npt.NDArray[np.uint8] = np.rint(unit * 255.0).astype(np.uint8)
    return shown


@dataclass(frozen=True)
class Letterbox:
    """Where a source image lands inside the square model input.

    Attributes
    ----------
    input_size
        Side of the model input.
    resized_h, resized_w
        Size of the resized image inside the input.
    pad_top, pad_left
        Offset of the resized image (symmetric padding, extra pixel at the end).
    """

    input_size: int
    resized_h: int
    resized_w: int
    pad_top: int
    pad_left: int


def letterbox_geometry(shape: tuple[int, int], input_size: int) -> Letterbox:
    """Return the letterbox placement used by :func:`preprocess` for a (H, W) image.

    Mirrors MONAI ``Resize(size_mode="longest")`` (``round(side * input_size / longest)``)
    followed by symmetric ``SpatialPad``.

    Parameters
    ----------
    shape
        Source (H, W).
    input_size
        Side of the square model input.
    """
    height, width = int(shape[0]), int(shape[1])
    scale = input_size / max(height, width)
    resized_h, resized_w = int(round(height * scale)), int(round(width * scale))
    return Letterbox(
        input_size=input_size,
        resized_h=resized_h,
        resized_w=resized_w,
        pad_top=(input_size - resized_h) // 2,
        pad_left=(input_size - resized_w) // 2,
    )


def input_placement(shape: tuple[int, int], spec: PreprocessSpec) -> Letterbox:
    """Return where a (H, W) image (after cropping) lands in the model input of ``spec``.

    ``squash`` fills the whole input; ``letterbox`` is :func:`letterbox_geometry`.

    Parameters
    ----------
    shape
        (H, W) of the cropped source.
    spec
        Preprocessing spec.
    """
    if spec.geometry == "squash":
        return Letterbox(spec.input_size, spec.input_size, spec.input_size, 0, 0)
    return letterbox_geometry(shape, spec.input_size)


def _spatial_chain(spec: PreprocessSpec) -> Compose:
    two_step = spec.source_size is not None and spec.source_size != spec.input_size
    first = (
        [Resize(spatial_size=(spec.source_size, spec.source_size), mode="area")]
        if two_step and spec.source_size is not None
        else []
    )
    steps: list[Any] = (
        [*first, Resize(spatial_size=(spec.input_size, spec.input_size), mode="area")]
        if spec.geometry == "squash"
        else [
            Resize(spatial_size=spec.input_size, size_mode="longest", mode="area"),
            SpatialPad(spatial_size=(spec.input_size, spec.input_size), mode="constant"),
        ]
    )
    if spec.channels == 3:
        steps.append(RepeatChannel(repeats=3))
    steps.append(
        NormalizeIntensity(
            subtrahend=np.array([spec.mean], dtype=np.float32),
            divisor=np.array([spec.std], dtype=np.float32),
        )
    )
    return Compose(steps)


def crop_box(pixels: npt.NDArray[Any], spec: PreprocessSpec) -> CropBox:
    """Return the part of ``pixels`` that :func:`preprocess` keeps (all of it without cropping).

    Parameters
    ----------
    pixels
        Stored values.
    spec
        Preprocessing spec.
    """
    if spec.crop_borders:
        return content_box(pixels)
    arr = _validated(pixels)
    return CropBox(0, int(arr.shape[0]), 0, int(arr.shape[1]))


def preprocess(pixels: npt.NDArray[Any], meta: PixelMeta, spec: PreprocessSpec) -> FloatArray:
    """Turn stored pixel values into the model input.

    Steps: uniform-border crop (:func:`content_box`, if ``spec.crop_borders``) -> Modality
    LUT (PS3.3 C.11.1, linear rescale) -> intensity range (``spec.intensity``: the image's
    own percentiles, or the VOI window of PS3.3 C.11.2) -> MONOCHROME1 inversion (PS3.3
    C.7.6.3.1.2) -> [0, 1] -> resize to ``spec.input_size`` (``spec.geometry``: squash or
    letterbox) -> channels -> normalisation. Deterministic. The one function training,
    evaluation and the daemon use.

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
    box = crop_box(pixels, spec)
    kept = np.asarray(pixels)[box.top : box.bottom, box.left : box.right]
    unit = to_unit_range(kept, meta, spec)
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
