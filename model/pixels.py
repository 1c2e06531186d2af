"""Typed pixel metadata handed from the DICOM reader to the model.

The reader (``dicom_io``) extracts these attributes from the Image Pixel, Modality LUT and
VOI LUT modules; plain JPEG/PNG files get the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

PHOTOMETRIC_VALUES = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB"})
VOI_LUT_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})


@dataclass(frozen=True)
class PixelMeta:
    """Pixel interpretation metadata of one image.

    Attributes
    ----------
    photometric
        Photometric Interpretation (PS3.3 C.7.6.3.1.2): ``MONOCHROME1`` (minimum value is
        white), ``MONOCHROME2`` (minimum value is black) or ``RGB``.
    rescale_slope, rescale_intercept
        Linear Modality LUT (PS3.3 C.7.6.1.1 / C.11.1): ``out = slope * stored + intercept``.
    window_center, window_width
        First VOI LUT window (PS3.3 C.11.2.1.2); ``None`` when the object has none.
    voi_lut_function
        VOI LUT Function (0028,1056): ``LINEAR`` (default), ``LINEAR_EXACT`` or ``SIGMOID``.
    bits_stored
        Bits Stored (0028,0101), informational.
    pixel_spacing_mm
        Row and column spacing in millimetres, informational.
    """

    photometric: str = "MONOCHROME2"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float | None = None
    window_width: float | None = None
    voi_lut_function: str = "LINEAR"
    bits_stored: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        """Validate eagerly, naming the offending argument.

        Only what would make the pixels uninterpretable is refused (photometric, slope 0).
        A defective VOI window is tolerated here; :meth:`window_problem` says why it will be
        ignored, and preprocessing then falls back to the image's own intensity range.
        """
        if self.photometric not in PHOTOMETRIC_VALUES:
            raise ValueError(
                f"photometric must be one of {sorted(PHOTOMETRIC_VALUES)}, got {self.photometric!r}"
            )
        if self.rescale_slope == 0:
            raise ValueError("rescale_slope must not be 0")

    def window_problem(self) -> str | None:
        """Return why the VOI window cannot be used (PS3.3 C.11.2.1.2), or ``None`` if it can.

        Returns ``"absent"`` when no window is given.
        """
        if self.window_center is None and self.window_width is None:
            return "absent"
        if self.window_center is None or self.window_width is None:
            return "window_center and window_width must be given together"
        if self.voi_lut_function not in VOI_LUT_FUNCTIONS:
            return f"unsupported VOI LUT function {self.voi_lut_function!r}"
        if self.voi_lut_function == "LINEAR_EXACT":
            if self.window_width <= 0:
                return f"window_width {self.window_width} must be > 0 for LINEAR_EXACT"
        elif self.window_width < 1:
            return f"window_width {self.window_width} must be >= 1 for {self.voi_lut_function}"
        return None

    @property
    def has_window(self) -> bool:
        """Whether a usable VOI window is present."""
        return self.window_problem() is None
